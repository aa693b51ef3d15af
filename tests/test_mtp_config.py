"""mtp.json: a file path or inline JSON, the plugin's section, and one-line errors before weights load."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from vllm.engine.arg_utils import EngineArgs

from vllm_mtp_gemma4.config import (
    ADAPTIVE_BY_DEFAULT,
    SECTION,
    MTPConfigError,
    PluginConfig,
    check_draft_parallelism,
    check_request_options,
    load_speculative_config,
)

from .conftest import ASSISTANT, ENGINE, TARGET, V2_ENV

REPO = Path(__file__).resolve().parent.parent
GOOD = {"method": "mtp", "model": str(ASSISTANT), "num_speculative_tokens": 3}


def test_file_path_and_inline_json_give_the_same_config(tmp_path):
    path = tmp_path / "mtp.json"
    path.write_text(json.dumps(GOOD))
    assert load_speculative_config(str(path)) == load_speculative_config(json.dumps(GOOD)) == GOOD


def test_shipped_config_resolves_to_the_plugin(monkeypatch):
    monkeypatch.chdir(REPO)  # its paths are relative to the repository root, where `vllm serve` runs
    config = EngineArgs(**ENGINE, speculative_config=str(REPO / "configs" / "mtp.json")).create_engine_config()
    assert PluginConfig.from_additional_config(config.additional_config) is not None
    assert config.speculative_config.use_gemma4_mtp()


def write_target_copy(tmp_path: Path) -> Path:
    """Another family's checkpoint config (Llama), for a spec that asks for the plugin with it."""
    copy = tmp_path / "not-gemma"
    copy.mkdir()
    (copy / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 192, "intermediate_size": 384,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 4096,
        "max_position_embeddings": 2048}))
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
        "unknown key": (target, json.dumps({**GOOD, "num_drafts": 3, SECTION: {}}), "unknown key 'num_drafts'"),
        "unknown plugin key": (target, json.dumps({**GOOD, SECTION: {"turbo": True}}),
                               f"{SECTION}.turbo: unknown key"),
        "wrong type": (target, json.dumps({**GOOD, "num_speculative_tokens": "3", SECTION: {}}),
                       "'num_speculative_tokens' must be int, got str '3'"),
        "K below 1": (target, json.dumps({**GOOD, "num_speculative_tokens": 0, SECTION: {}}),
                      "'num_speculative_tokens' must be an integer >= 1, got 0"),
        "missing draft": (target, json.dumps({**GOOD, "model": str(tmp_path / "nope"), SECTION: {}}),
                          f"speculative config 'model': {tmp_path / 'nope'}: Value error, Invalid repository ID or "
                          f"local directory specified"),
        "draft not an assistant": (target, json.dumps({**GOOD, "model": target, SECTION: {}}),
                                   f"speculative config 'model': {target}: not a Gemma 4 assistant"),
        "backbone mismatch": (target, json.dumps({**GOOD, "model": str(wrong_backbone)}),
                              "backbone_hidden_size 256 does not match the target's hidden_size 192"),
        "target not Gemma 4": (str(write_target_copy(tmp_path)), json.dumps({**GOOD, SECTION: {}}),
                               "target is 'llama', not Gemma 4"),
        "malformed JSON": (target, '{\n  "method": "mtp",\n  "model" "x"\n}\n',
                           "malformed JSON at line 3, column 11"),
        "relaxed topk below 1": (target, json.dumps({**GOOD, SECTION: {"relaxed_topk": 0}}),
                                 f"{SECTION}.relaxed_topk: must be an integer >= 1, got 0"),
        "relaxed delta out of range": (target, json.dumps({**GOOD, SECTION: {"relaxed_delta": 1.5}}),
                                       f"{SECTION}.relaxed_delta: must be a number in [0, 1], got 1.5"),
        "relaxed flag not boolean": (target, json.dumps({**GOOD, SECTION: {"relaxed_acceptance": "on"}}),
                                     f"{SECTION}.relaxed_acceptance: must be true or false, got 'on'"),
        "fused not boolean": (target, json.dumps({**GOOD, SECTION: {"fused": 1}}),
                              f"{SECTION}.fused: must be true or false, got 1"),
    }


@pytest.mark.parametrize("case", [
    "unknown key", "unknown plugin key", "wrong type", "K below 1", "missing draft", "draft not an assistant",
    "backbone mismatch", "target not Gemma 4", "malformed JSON", "relaxed topk below 1",
    "relaxed delta out of range", "relaxed flag not boolean", "fused not boolean",
])
def test_resolve_rejects(case, tmp_path):
    """Through vLLM's own config building (``create_engine_config``, no weights loaded)."""
    target, text, fragment = bad_cases(tmp_path)[case]
    path = tmp_path / "mtp.json"
    path.write_text(text)
    with pytest.raises(MTPConfigError) as err:
        EngineArgs(**{**ENGINE, "model": target}, speculative_config=str(path)).create_engine_config()
    assert fragment in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(("options", "fragment"), [
    ({"relaxed_topk": 0}, "vllm_xargs.relaxed_topk: must be an integer >= 1, got 0"),
    ({"relaxed_delta": -0.1}, "vllm_xargs.relaxed_delta: must be a number in [0, 1], got -0.1"),
    ({"relaxed_acceptance": "yes"}, "vllm_xargs.relaxed_acceptance: must be true or false (0 or 1 over HTTP)"),
    ({"relaxed_acceptance": 2}, "vllm_xargs.relaxed_acceptance: must be true or false (0 or 1 over HTTP), got 2"),
])
def test_request_options_rejected(options, fragment):
    with pytest.raises(MTPConfigError, match=re.escape(fragment)):
        check_request_options(options, relaxed_unavailable=None)


def test_request_options_override_the_config():
    config = PluginConfig(relaxed_topk=4)
    settings, opted_in = config.relaxed_for_request({"relaxed_acceptance": True, "relaxed_delta": 0.2, "other": 1})
    assert (settings.enabled, settings.topk, settings.delta, opted_in) == (True, 4, 0.2, True)
    assert config.relaxed_for_request(None) == (config.relaxed, False)
    assert config.relaxed_for_request({"relaxed_acceptance": 1})[1] is True  # HTTP has no booleans in vllm_xargs
    check_request_options({"relaxed_acceptance": True}, relaxed_unavailable=None)
    with pytest.raises(MTPConfigError, match="this server runs Model Runner V1 without the fused step"):
        check_request_options({"relaxed_acceptance": True},
                              relaxed_unavailable="this server runs Model Runner V1 without the fused step")


@pytest.mark.parametrize(("section", "runner", "fragment"), [
    ({"relaxed_acceptance": True, "fused": False}, "V1", f"{SECTION}.relaxed_acceptance: needs the fused step on "
                                                         "Model Runner V1"),
    ({"adaptive_k": True, "fused": False}, "V1", f"{SECTION}.adaptive_k: needs the fused step"),
    ({"fused": True}, "V2", f"{SECTION}.fused: the plugin's fused step runs on Model Runner V1 only"),
    ({"adaptive_k": True}, "V2", f"{SECTION}.adaptive_k: not available on Model Runner V2"),
])
def test_settings_a_runner_cannot_honour_are_errors(section, runner, fragment):
    with pytest.raises(MTPConfigError, match=re.escape(fragment)):
        PluginConfig.from_dict(section).for_runner(runner)


def test_the_runner_decides_what_fused_means():
    assert PluginConfig().for_runner("V1").fused is True
    assert PluginConfig.from_dict({"fused": False}).for_runner("V1").fused is False
    assert PluginConfig.from_dict({"relaxed_acceptance": True}).for_runner("V2").fused is False
    assert PluginConfig.from_dict({"fused": False}).for_runner("V2").fused is False


def test_the_runner_decides_what_adaptive_k_left_out_means():
    """Left out: the default where the fused step runs, off elsewhere (V2, "fused": false), never an error."""
    assert PluginConfig().for_runner("V1").adaptive_k is ADAPTIVE_BY_DEFAULT
    assert PluginConfig().for_runner("V2").adaptive_k is False
    assert PluginConfig.from_dict({"fused": False}).for_runner("V1").adaptive_k is False
    assert PluginConfig.from_dict({"adaptive_k": False}).for_runner("V1").adaptive_k is False
    assert PluginConfig.from_dict({"adaptive_k": True}).for_runner("V1").adaptive_k is True


def test_draft_tensor_parallel_size_must_match_the_target():
    check_draft_parallelism({"draft_tensor_parallel_size": 2}, 2)
    check_draft_parallelism({}, 2)
    with pytest.raises(MTPConfigError, match="'draft_tensor_parallel_size' is 1 but the target runs with "
                                             "--tensor-parallel-size 2"):
        check_draft_parallelism({"draft_tensor_parallel_size": 1}, 2)


# Each case is a `vllm serve` process (about 15 s). By default four (the JSON file, the config and the CLI flags);
# every check is also tested above through vLLM's config building, and all run here under -m scale.
SERVE_CASES = ["unknown key", "malformed JSON", "async scheduling on V1", "--spec-* flags"]
MORE_SERVE_CASES = ["K below 1", "backbone mismatch", "relaxed delta out of range", "draft TP mismatch",
                    "adaptive K on V2", "target not Gemma 4", "fused on V2"]


@pytest.mark.engine
@pytest.mark.parametrize("case", SERVE_CASES + [pytest.param(c, marks=pytest.mark.scale) for c in MORE_SERVE_CASES])
def test_vllm_serve_exits_with_one_line(case, tmp_path):
    cases = {**bad_cases(tmp_path), "draft TP mismatch": (
        str(TARGET), json.dumps({**GOOD, "draft_tensor_parallel_size": 1, SECTION: {}}),
        "'draft_tensor_parallel_size' is 1 but the target runs with --tensor-parallel-size 2"),
        "async scheduling on V1": (str(TARGET), json.dumps(GOOD), "--async-scheduling: the plugin's fused step on "
                                                                  "Model Runner V1 runs without async scheduling"),
        "adaptive K on V2": (str(TARGET), json.dumps({**GOOD, SECTION: {"adaptive_k": True}}),
                             f"{SECTION}.adaptive_k: not available on Model Runner V2"),
        "fused on V2": (str(TARGET), json.dumps({**GOOD, SECTION: {"fused": True}}),
                        f"{SECTION}.fused: the plugin's fused step runs on Model Runner V1 only"),
        # vLLM's own flags go through the same resolution: here an assistant whose backbone is not the target's.
        "--spec-* flags": (str(TARGET), None, "backbone_hidden_size 256 does not match")}
    target, text, fragment = cases[case]
    path = tmp_path / "mtp.json"
    path.write_text(text or "")
    spec = ["--speculative-config", str(path)] if text else ["--spec-method", "mtp", "--spec-model",
                                                             str(tmp_path / "assistant-256"), "--spec-tokens", "3"]
    vllm = Path(sys.executable).parent / "vllm"
    extra = {"draft TP mismatch": ["--tensor-parallel-size", "2"], "async scheduling on V1": ["--async-scheduling"]}
    env = {**os.environ, **V2_ENV} if case.endswith("on V2") else None
    proc = subprocess.run([str(vllm), "serve", target, *spec, "--port", "0", *extra.get(case, [])],
                          capture_output=True, text=True, timeout=180, cwd=tmp_path, env=env)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and fragment in errors[0], output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert "Starting to load model" not in output
