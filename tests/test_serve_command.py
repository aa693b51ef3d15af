"""The README's first command serves the bundled pair with MTP and answers OpenAI clients."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests
from openai import OpenAI

pytestmark = pytest.mark.engine
REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen(["bash", "scripts/serve.sh"], cwd=REPO, env={**os.environ, "PORT": str(port)},
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 300
    while "==> Serving" not in log.read_text():
        if proc.poll() is not None or time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"serve.sh did not come up:\n{log.read_text()[-4000:]}")
        time.sleep(1)
    yield f"http://127.0.0.1:{port}", log
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def test_serve_prints_how_to_query(served):
    _, log = served
    text = log.read_text()
    assert "curl http://127.0.0.1:" in text and "OpenAI(base_url=" in text


def test_completion_with_mtp(served):
    base, _ = served
    client = OpenAI(base_url=f"{base}/v1", api_key="none")
    out = client.completions.create(model="gemma4-tiny", prompt="def fibonacci(n):\n", max_tokens=48, temperature=0)
    assert out.choices[0].text.strip()
    assert out.usage.completion_tokens == 48
    metrics = requests.get(f"{base}/metrics", timeout=10).text
    drafts = re.search(r"^vllm:spec_decode_num_drafts_total\{.*\} (\S+)$", metrics, re.M)
    assert drafts and float(drafts.group(1)) > 0, "no speculative steps ran"


def test_reasoning_parser_splits_thinking_from_answer(served):
    base, _ = served
    client = OpenAI(base_url=f"{base}/v1", api_key="none")
    out = client.chat.completions.create(
        model="gemma4-tiny", temperature=0, max_tokens=256,
        messages=[{"role": "user", "content": "Write `def rgb_to_hls(r, g, b):` from colorsys."}],
        extra_body={"chat_template_kwargs": {"enable_thinking": True}},
    )
    msg = out.choices[0].message
    reasoning = (msg.model_extra or {}).get("reasoning") or (msg.model_extra or {}).get("reasoning_content")
    assert reasoning and reasoning.strip(), msg
    assert msg.content and "def " in msg.content, msg
    assert "<channel|>" not in msg.content and "<|channel>" not in (reasoning + msg.content)
