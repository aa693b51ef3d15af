"""Shared fixtures: the bundled model pair, held-out prompts, and engine runs shared per session.

Each engine start costs 30 to 60 s on 2 cores, so every engine run that several tests read is a
session-scoped fixture, run once in its own subprocess (``vllm_mtp_gemma4.bench.job``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from vllm_mtp_gemma4.bench import job
from vllm_mtp_gemma4.bench.job import Job, JobResult, run_job
from vllm_mtp_gemma4.config import THINKING_CLOSE

REPO = Path(__file__).resolve().parent.parent
FIXTURE_DIR = REPO / "fixtures" / "gemma4-tiny"
TARGET = FIXTURE_DIR / "target"
ASSISTANT = FIXTURE_DIR / "assistant"
ASSISTANT_CENTROIDS = FIXTURE_DIR / "assistant-centroids"
GREEDY_TOKENS = 64
# Model Runner V2 through Triton's interpreter (``tests/mrv2/sitecustomize.py``), for every process of a job.
V2_ENV = {"VLLM_USE_V2_MODEL_RUNNER": "1", "TRITON_INTERPRET": "1",
          "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "tests" / "mrv2"), str(REPO),
                                                      os.environ.get("PYTHONPATH")]))}
# fp32 and no torch.compile: exact comparisons with Hugging Face, and the fastest engine start.
ENGINE = {"model": str(TARGET), "dtype": "float32", "enforce_eager": True, "max_model_len": 2048}
# Engine jobs run vLLM's engine core in the job's own process (V1 multiprocessing off; at TP=1 the executor is then
# vLLM's uniprocess one): a start takes about 20 s instead of 45 on 2 cores, most of it importing vLLM once, not
# three times. Jobs given MULTIPROCESS, servers and TP > 1 keep vLLM's process layout. In-process, vLLM binds no
# OpenMP threads (its CPU worker does that in its own process), so torch is held to one thread here: two OpenMP
# threads on a loaded 2-core machine spin against each other and make steps many times slower.
job.DEFAULT_ENV.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", OMP_NUM_THREADS="1")
# The same for the tests' own tensor work (Hugging Face generation, ops at real widths): on two threads at a load
# of 10 to 30, the Hugging Face parity test took 588 s.
torch.set_num_threads(1)
MULTIPROCESS = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}


THINKING_FUNCTIONS = [
    ("rgb_to_hls(r, g, b)", "colorsys"), ("as_integer_ratio(self)", "fractions"), ("__repr__(self)", "fractions"),
    ("dedent(text)", "textwrap"), ("fill(text, width=70)", "textwrap"), ("quote(s)", "shlex"),
    ("split(s, comments=False)", "shlex"), ("getcwdu()", "os"), ("isabs(s)", "posixpath"),
    ("basename(p)", "posixpath"), ("mean(data)", "statistics"), ("median(data)", "statistics"),
    ("bisect_left(a, x)", "bisect"), ("heappush(heap, item)", "heapq"), ("escape(s, quote=True)", "html"),
    ("b64encode(s)", "base64"),
]
THINKING_TOKENS = 160


def thinking_prompts() -> list[list[int]]:
    tok = AutoTokenizer.from_pretrained(TARGET)
    texts = [tok.apply_chat_template([{"role": "user", "content": f"Write `def {fn}:` from {module}."}],
                                     add_generation_prompt=True, enable_thinking=True, tokenize=False)
             for fn, module in THINKING_FUNCTIONS]
    return [tok(text, add_special_tokens=False).input_ids for text in texts]  # the template has <bos>


def close_id() -> int:
    return AutoTokenizer.from_pretrained(TARGET).convert_tokens_to_ids(THINKING_CLOSE)


def mtp_config(k: int = 3, assistant=ASSISTANT) -> dict:
    return {"method": "mtp", "model": str(assistant), "num_speculative_tokens": k}


@pytest.fixture(scope="session")
def held_out_prompts() -> list[str]:
    """32 prompts cut from standard-library files the fixture never trained on."""
    return json.loads((FIXTURE_DIR / "held_out_prompts.json").read_text())


@pytest.fixture(scope="session")
def plain_greedy(held_out_prompts) -> JobResult:
    """Plain decoding (no speculation), greedy, plugin loaded, in vLLM's default offline processes."""
    return run_job(Job(engine=ENGINE, prompts=held_out_prompts,
                       sampling={"temperature": 0.0, "max_tokens": GREEDY_TOKENS}, env=MULTIPROCESS))


@pytest.fixture(scope="session")
def upstream_mtp_greedy(held_out_prompts) -> JobResult:
    """vLLM's own Gemma 4 MTP path (plugins off), K=3, greedy."""
    return run_job(Job(engine={**ENGINE, "speculative_config": mtp_config(3)}, prompts=held_out_prompts,
                       sampling={"temperature": 0.0, "max_tokens": GREEDY_TOKENS}, plugins=False))


@pytest.fixture(scope="session")
def plugin_mtp_greedy(held_out_prompts, tmp_path_factory) -> JobResult:
    """The plugin's proposer, K=3, greedy, configured by an mtp.json file path, in vLLM's default offline
    processes."""
    path = tmp_path_factory.mktemp("config") / "mtp.json"
    path.write_text(json.dumps({**mtp_config(3), "vllm_mtp_gemma4": {}}))
    return run_job(Job(engine={**ENGINE, "speculative_config": str(path)}, prompts=held_out_prompts,
                       sampling={"temperature": 0.0, "max_tokens": GREEDY_TOKENS}, env=MULTIPROCESS))


@pytest.fixture(scope="session")
def plain_thinking() -> JobResult:
    """Plain greedy decoding of the thinking prompts, plugin loaded."""
    prompts = thinking_prompts()
    return run_job(Job(engine=ENGINE, prompts=prompts,
                       sampling={"temperature": 0.0, "max_tokens": THINKING_TOKENS}))
