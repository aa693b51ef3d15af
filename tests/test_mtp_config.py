"""mtp.json: a file path or inline JSON, the plugin's section, and one-line errors before weights load."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_mtp_gemma4.config import SECTION, MTPConfigError, PluginConfig, load_speculative_config, resolve

from .conftest import ASSISTANT, TARGET

REPO = Path(__file__).resolve().parent.parent
GOOD = {"method": "mtp", "model": str(ASSISTANT), "num_speculative_tokens": 3}
ALLOWED = {"method", "model", "num_speculative_tokens", "draft_tensor_parallel_size", "quantization"}


def test_file_path_and_inline_json_give_the_same_config(tmp_path):
    path = tmp_path / "mtp.json"
    path.write_text(json.dumps(GOOD))
    assert load_speculative_config(str(path)) == load_speculative_config(json.dumps(GOOD)) == GOOD


def test_shipped_config_resolves_to_the_plugin(monkeypatch):
    spec = load_speculative_config(str(REPO / "configs" / "mtp.json"))
    monkeypatch.chdir(REPO)  # its paths are relative to the repository root, where `vllm serve` runs
    rest, plugin = resolve(spec, str(TARGET), ALLOWED)
    assert SECTION not in rest and isinstance(plugin, PluginConfig)


def test_other_methods_and_targets_pass_through_untouched():
    assert resolve({"method": "ngram", "num_speculative_tokens": 3}, str(TARGET), ALLOWED | {"prompt_lookup_max"}) == (
        {"method": "ngram", "num_speculative_tokens": 3}, None)


def write_target_copy(tmp_path: Path, **overrides) -> Path:
    copy = tmp_path / "not-gemma"
    copy.mkdir()
    (copy / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 192, **overrides}))
    return copy


def bad_cases(tmp_path: Path) -> dict[str, tuple[str, str, str]]:
    """name -> (target, speculative-config file text, expected fragment of the one error line)."""
    wrong_backbone = tmp_path / "assistant-256"
    shutil.copytree(ASSISTANT, wrong_backbone)
    cfg = json.loads((wrong_backbone / "config.json").read_text())
    cfg["backbone_hidden_size"] = 256
    (wrong_backbone / "config.json").write_text(json.dumps(cfg))
    target = str(TARGET)
    return {
        "unknown key": (target, json.dumps({**GOOD, "num_drafts": 3}), "unknown key 'num_drafts'"),
        "unknown plugin key": (target, json.dumps({**GOOD, SECTION: {"turbo": True}}),
                               f"{SECTION}.turbo: unknown key"),
        "wrong type": (target, json.dumps({**GOOD, "num_speculative_tokens": "3"}),
                       "'num_speculative_tokens' must be int, got str '3'"),
        "K below 1": (target, json.dumps({**GOOD, "num_speculative_tokens": 0}),
                      "'num_speculative_tokens' must be an integer >= 1, got 0"),
        "missing draft": (target, json.dumps({**GOOD, "model": str(tmp_path / "nope")}), "directory not found"),
        "draft not an assistant": (target, json.dumps({**GOOD, "model": target}),
                                   "model_type 'gemma4_text' is not a Gemma 4 assistant"),
        "backbone mismatch": (target, json.dumps({**GOOD, "model": str(wrong_backbone)}),
                              "backbone_hidden_size 256 does not match the target's hidden_size 192"),
        "target not Gemma 4": (str(write_target_copy(tmp_path)), json.dumps({**GOOD, SECTION: {}}),
                               "target is 'llama', not Gemma 4"),
        "malformed JSON": (target, '{\n  "method": "mtp",\n  "model" "x"\n}\n',
                           "malformed JSON at line 3, column 11"),
    }


@pytest.mark.parametrize("case", [
    "unknown key", "unknown plugin key", "wrong type", "K below 1", "missing draft", "draft not an assistant",
    "backbone mismatch", "target not Gemma 4", "malformed JSON",
])
def test_resolve_rejects(case, tmp_path):
    target, text, fragment = bad_cases(tmp_path)[case]
    path = tmp_path / "mtp.json"
    path.write_text(text)
    with pytest.raises(MTPConfigError) as err:
        resolve(load_speculative_config(str(path)), target, ALLOWED)
    assert fragment in str(err.value) and "\n" not in str(err.value)


@pytest.mark.engine
@pytest.mark.parametrize("case", ["unknown key", "K below 1", "backbone mismatch", "malformed JSON",
                                  "target not Gemma 4"])
def test_vllm_serve_exits_with_one_line(case, tmp_path):
    target, text, fragment = bad_cases(tmp_path)[case]
    path = tmp_path / "mtp.json"
    path.write_text(text)
    vllm = Path(sys.executable).parent / "vllm"
    proc = subprocess.run([str(vllm), "serve", target, "--speculative-config", str(path), "--port", "0"],
                          capture_output=True, text=True, timeout=180, cwd=tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and fragment in errors[0], output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert "Starting to load model" not in output
