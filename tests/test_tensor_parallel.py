"""Tensor parallelism with speculation on CPU workers (the ``mp`` backend): TP=2 gives TP=1's tokens.

Each rank's runner verifies the whole batch itself, so every rank must draw the same tokens: the noise key of an
unseeded request is a hash of its request id, never process-local randomness.
"""

from __future__ import annotations

import pytest

from vllm_mtp_gemma4.bench.job import Job, JobResult, run_job

from .conftest import ENGINE, mtp_config

pytestmark = pytest.mark.engine
SPEC = {**mtp_config(3), "vllm_mtp_gemma4": {}}
TP2 = {"tensor_parallel_size": 2, "distributed_executor_backend": "mp"}
TP2_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}  # one core per rank; vLLM's CPU TP needs an explicit binding


def _workload(prompts: list[str]) -> tuple[list[str], list[dict]]:
    greedy = [{"temperature": 0.0, "max_tokens": 48}] * 8
    seeded = [{"temperature": 0.8, "top_p": 0.95, "max_tokens": 48, "seed": 40 + i} for i in range(8)]
    return prompts[:8] * 2, greedy + seeded


@pytest.fixture(scope="module")
def tp1(held_out_prompts) -> JobResult:
    prompts, sampling = _workload(held_out_prompts)
    return run_job(Job(engine={**ENGINE, "speculative_config": SPEC}, prompts=prompts, sampling=sampling))


@pytest.fixture(scope="module")
def tp2(held_out_prompts) -> JobResult:
    prompts, sampling = _workload(held_out_prompts)
    return run_job(Job(engine={**ENGINE, **TP2, "speculative_config": SPEC}, prompts=prompts, sampling=sampling,
                       env=TP2_ENV, worker_counters=True))


def test_tp2_greedy_is_token_identical_to_tp1(tp1, tp2, plain_greedy):
    assert tp2.token_ids[:8] == tp1.token_ids[:8]
    assert [t[:48] for t in plain_greedy.token_ids[:8]] == tp2.token_ids[:8]
    assert len(tp2.worker_counters) == 2 and all(c["fused"] and c["steps"] > 0 for c in tp2.worker_counters)
    assert tp2.spec.num_drafts > 0


def test_tp2_seeded_sampling_matches_tp1(tp1, tp2):
    assert tp2.token_ids[8:] == tp1.token_ids[8:]
