"""``tools/check_vllm_api.py``: every vLLM name the plugin imports, patches or subclasses exists in the installed
vLLM with the signature the plugin was written against; a vLLM without them is reported name by name."""

from __future__ import annotations

import subprocess
import sys

from .conftest import REPO

TOOL = REPO / "tools" / "check_vllm_api.py"


def check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, timeout=120, cwd=REPO)


def test_installed_vllm_has_every_name_the_plugin_uses():
    proc = check()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 problem(s)" in proc.stdout


def test_a_vllm_without_them_is_reported(tmp_path):
    vllm = tmp_path / "vllm"
    (vllm / "engine").mkdir(parents=True)
    (vllm / "__init__.py").write_text("")
    (vllm / "_version.py").write_text("__version__ = version = '9.9.9'\n")
    (vllm / "engine" / "__init__.py").write_text("")
    (vllm / "engine" / "arg_utils.py").write_text(
        "class EngineArgs:\n    def create_engine_config(self, usage_context=None):\n        pass\n")
    proc = check("--vllm", str(vllm))
    lines = proc.stdout.splitlines()
    assert proc.returncode == 1 and lines[0].startswith("vLLM 9.9.9 at "), proc.stdout + proc.stderr
    assert "  vllm.engine.arg_utils.EngineArgs.create_engine_config: signature (self, usage_context=), written " \
           "against (self, usage_context=, headless=) (vLLM 0.32.0)" in lines
    assert any(line.endswith("vllm.engine.arg_utils.EngineArgs.create_speculative_config: not found") for line in lines)
    assert any(line.endswith("vllm.v1.engine.async_llm.AsyncLLM: not found") for line in lines)
