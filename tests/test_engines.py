"""The plugin stays inside its own engines: which engine is the plugin's is decided from vLLM's own resolved
configuration (hub ids, revisions, remote URIs, GGUF files as vLLM resolves them), every other engine gets exactly
vLLM's config or vLLM's error, and the plugin's engines can be built anywhere (twice from the same arguments,
without a tokenizer, from sync code)."""

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

from vllm_mtp_gemma4.config import SECTION, MTPConfigError

from .conftest import ASSISTANT, ENGINE, REPO, TARGET, mtp_config

ORG = "google"
HUB_TARGET, HUB_ASSISTANT, HUB_REVISED = f"{ORG}/gemma-4-tiny", f"{ORG}/gemma-4-tiny-assistant", f"{ORG}/gemma-4-rev"


def _snapshot(hub: Path, repo_id: str, files: dict[str, Path | str], commit: str, ref: str = "main") -> None:
    """One commit of ``repo_id`` in a Hugging Face hub cache (``hub/models--org--name``), as ``hf download`` lays
    it out: blobs, ``refs/<ref>`` holding the commit, and the snapshot's files linking to the blobs."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for name, source in files.items():
        blob = repo / "blobs" / f"{commit[:8]}-{name}"
        if isinstance(source, Path):
            blob.symlink_to(source.resolve())
        else:
            blob.write_text(source)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit)


def checkpoint_files(directory: Path) -> dict[str, Path]:
    return {p.name: p for p in directory.iterdir() if p.is_file()}


@pytest.fixture(scope="module")
def hub_home(tmp_path_factory) -> Path:
    """An offline hub cache holding the fixture pair under hub ids, and a working directory with a folder named
    like their org (``google/``, holding something else), as a user's checkout might have."""
    root = tmp_path_factory.mktemp("hub")
    hub = root / "hf" / "hub"
    _snapshot(hub, HUB_TARGET, checkpoint_files(TARGET), "a" * 40)
    _snapshot(hub, HUB_ASSISTANT, checkpoint_files(ASSISTANT), "b" * 40)
    # Main is another family's checkpoint; revision "gemma" is the Gemma 4 target.
    llama = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 192,
             "intermediate_size": 384, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
             "vocab_size": 4096, "max_position_embeddings": 2048}
    _snapshot(hub, HUB_REVISED, {**checkpoint_files(TARGET), "config.json": json.dumps(llama)}, "c" * 40)
    _snapshot(hub, HUB_REVISED, checkpoint_files(TARGET), "d" * 40, ref="gemma")
    (root / "work" / ORG / "notes").mkdir(parents=True)
    return root


def other_checkpoints(root: Path) -> dict[str, Path]:
    """Another family's MTP target (DeepSeek V3 layout, MTP layer in the checkpoint) and a GGUF file."""
    deepseek = root / "deepseek-tiny"
    deepseek.mkdir(exist_ok=True)
    (deepseek / "config.json").write_text(json.dumps({
        "model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"], "hidden_size": 128,
        "intermediate_size": 256, "moe_intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 4, "n_routed_experts": 4, "n_shared_experts": 1, "num_experts_per_tok": 2,
        "first_k_dense_replace": 1, "kv_lora_rank": 32, "q_lora_rank": 64, "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 16, "v_head_dim": 16, "vocab_size": 4096, "max_position_embeddings": 2048,
        "num_nextn_predict_layers": 1, "torch_dtype": "float32"}))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TARGET / name, deepseek / name)
    gguf = root / "gemma-4-tiny.Q8_0.gguf"
    gguf.write_bytes(b"GGUF" + bytes(64))
    return {"deepseek": deepseek, "gguf": gguf}


def run_cases(cases: dict[str, dict], cwd: Path, env: dict[str, str], plugins: bool) -> dict[str, dict]:
    path = cwd / f"cases-{'on' if plugins else 'off'}.json"
    path.write_text(json.dumps(cases))
    env = {**os.environ, **env, "PYTHONPATH": str(REPO)}
    if not plugins:
        env["VLLM_PLUGINS"] = "none"
    proc = subprocess.run([sys.executable, "-m", "tests.config_cases", str(path)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(lines[-1].removeprefix("RESULTS "))


@pytest.fixture(scope="module")
def resolved(hub_home) -> tuple[dict, dict]:
    """The same cases through ``create_engine_config``, plugin on and plugin off, from the working directory with
    the org's folder, the hub offline."""
    engine = {k: v for k, v in ENGINE.items() if k != "model"}
    others = other_checkpoints(hub_home)
    section = {SECTION: {}}
    hub_spec = {"method": "mtp", "model": HUB_ASSISTANT, "num_speculative_tokens": 3}
    cases = {
        "hub ids": {**engine, "model": HUB_TARGET, "speculative_config": hub_spec},
        "hub ids, section": {**engine, "model": HUB_TARGET, "speculative_config": {**hub_spec, **section}},
        "revision": {**engine, "model": HUB_REVISED, "revision": "gemma",
                     "speculative_config": {**hub_spec, **section}},
        "main revision, section": {**engine, "model": HUB_REVISED, "speculative_config": {**hub_spec, **section}},
        "main revision": {**engine, "model": HUB_REVISED, "speculative_config": hub_spec},
        "deepseek mtp": {**engine, "model": str(others["deepseek"]),
                         "speculative_config": {"method": "mtp", "num_speculative_tokens": 1}},
        "gemma 4 own mtp layers": {**engine, "model": str(TARGET),
                                   "speculative_config": {"method": "mtp", "num_speculative_tokens": 1}},
        "ngram": {**ENGINE, "speculative_config": {"method": "ngram", "num_speculative_tokens": 3,
                                                   "prompt_lookup_max": 3}},
        "s3 target": {**engine, "model": "s3://bucket/gemma-4-tiny", "speculative_config": hub_spec},
        "gguf target": {**engine, "model": str(others["gguf"]), "speculative_config": hub_spec},
    }
    env = {"HF_HOME": str(hub_home / "hf"), "HF_HUB_OFFLINE": "1"}
    cwd = hub_home / "work"
    return run_cases(cases, cwd, env, plugins=True), run_cases(cases, cwd, env, plugins=False)


@pytest.mark.parametrize("case", ["hub ids", "hub ids, section", "revision"])
def test_gemma4_hub_ids_are_the_plugins(resolved, case):
    on, off = resolved
    assert "config" in on[case], on[case]
    config = on[case]["config"]
    assert config["additional_config"][SECTION]["fused"] is True
    assert config["target_type"] == "gemma4_text" and config["draft"][1:] == ["gemma4_mtp", "mtp"]
    if case == "hub ids":  # vLLM itself runs the pair (its own Gemma 4 MTP)
        assert SECTION not in off[case]["config"]["additional_config"]
        assert config["draft"] == off[case]["config"]["draft"]


def test_the_revision_vllm_reads_is_the_one_the_plugin_reads(resolved):
    on, _ = resolved
    assert f"models--{ORG}--gemma-4-rev/snapshots/{'d' * 40}" in on["revision"]["config"]["str"]
    kind, message = on["main revision, section"]["error"]  # main: another family's checkpoint, read by vLLM
    assert kind == "MTPConfigError" and re.fullmatch(
        rf"model: \S*models--{ORG}--gemma-4-rev/snapshots/c{{40}}: target is 'llama', not Gemma 4 \(allowed: .*\)",
        message), message


@pytest.mark.parametrize("case", ["main revision", "deepseek mtp", "gemma 4 own mtp layers", "ngram", "s3 target",
                                  "gguf target"])
def test_other_engines_get_vllms_config_or_error(resolved, case):
    on, off = resolved
    assert on[case] == off[case]
    if "config" in on[case]:
        assert SECTION not in on[case]["config"]["additional_config"]


def engine_args(**overrides) -> EngineArgs:
    return EngineArgs(**{**ENGINE, "speculative_config": mtp_config(3), **overrides})


def test_create_engine_config_twice_gives_the_same_config():
    spec = {**mtp_config(2), SECTION: {"fused": False}}
    args = engine_args(speculative_config=spec)
    first, second = args.create_engine_config(), args.create_engine_config()
    assert first.additional_config[SECTION] == second.additional_config[SECTION]
    assert first.additional_config[SECTION]["fused"] is False
    assert str(first) == str(second) and first.compute_hash() == second.compute_hash()
    assert args.speculative_config == spec  # the arguments are left as given
    flags = EngineArgs(**ENGINE, spec_method="mtp", spec_model=str(ASSISTANT), spec_tokens=2)
    assert str(flags.create_engine_config()) == str(flags.create_engine_config()) == str(first)


def test_skip_tokenizer_init_is_one_error_naming_it():
    with pytest.raises(MTPConfigError, match=r"^skip_tokenizer_init: the plugin reads Gemma 4's thinking markers"):
        engine_args(skip_tokenizer_init=True).create_engine_config()
    ngram = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3}
    config = engine_args(skip_tokenizer_init=True, speculative_config=ngram).create_engine_config()
    assert SECTION not in config.additional_config  # not the plugin's engine: vLLM's as ever


def test_vllms_own_refusal_of_a_plugin_spec_is_one_line():
    """A spec with the plugin's section that vLLM itself refuses: one line, naming the draft where vLLM names it."""
    spec = {**mtp_config(3), SECTION: {}}
    with pytest.raises(MTPConfigError, match=re.escape(
            "speculative config: --spec-tokens and --speculative-config['num_speculative_tokens'] are mutually "
            "exclusive")):
        engine_args(speculative_config=spec, spec_tokens=2).create_engine_config()
    with pytest.raises(MTPConfigError, match=re.escape(
            f"speculative config 'model': {TARGET}: not a Gemma 4 assistant (Unsupported speculative method: 'mtp'")):
        engine_args(speculative_config={**spec, "model": str(TARGET)}).create_engine_config()


def test_relative_draft_path_becomes_absolute(monkeypatch):
    monkeypatch.chdir(REPO)
    config = engine_args(speculative_config=mtp_config(3, ASSISTANT.relative_to(REPO))).create_engine_config()
    assert config.speculative_config.model == config.speculative_config.draft_model_config.model == str(ASSISTANT)


@pytest.mark.engine
def test_async_llm_from_sync_code_reports_and_releases():
    """``AsyncLLM`` built with no running event loop; the drafter is reported once a loop serves it; streams cut
    after two outputs leave no phase state behind; the phase counters carry vLLM's engine and model labels."""
    proc = subprocess.run([sys.executable, "-m", "tests.engine_scenarios", "async_from_sync"], cwd=REPO,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    [(runner, drafter, assistant, k)] = result["drafters"]
    assert (runner, k) == ("V1", "3") and "Gemma4MTPProposer" in drafter and assistant.startswith("vllm_mtp_gemma4")
    assert result["cut"] == 4 and result["tracked_after_cut"] == 0 and result["tracked_after_all"] == 0, result
    engines = {(labels["model_name"], labels["engine"]) for labels in result["vllm_labels"]}
    assert engines == {("gemma4-tiny", "0")}, result
    assert {(labels["model_name"], labels["engine"]) for labels in result["phase_labels"]} == engines, result
