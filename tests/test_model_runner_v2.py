"""The plugin on Model Runner V2, vLLM's default on CUDA, run here on CPU through Triton's interpreter.

``tests/mrv2/sitecustomize.py`` switches every process of a job to V2 (``conftest.V2_ENV``). The interpreter runs
each Triton kernel in Python, so these are correctness runs on a few short requests; their timings mean nothing.
Two engines serve every test here:
- ``v2_strict``: greedy held-out and thinking prompts, with chunked prefill (a 64-token budget) and a cache small
  enough to preempt;
- ``v2_relaxed``: the thinking prompts opted in to relaxed acceptance, between two copies of a seeded sampled
  request, with a 32-token prefill budget (every prompt prefills in chunks);
and one short upstream V2 run (plugins off) of the seeded request alone, and one TP=2 run.
"""

from __future__ import annotations

import pytest

from vllm_mtp_gemma4.bench.job import Job, JobResult, run_job

from .conftest import ENGINE, THINKING_TOKENS, V2_ENV, mtp_config, thinking_prompts
from .relaxed_rule import assert_tokens_obey_the_rule, score

pytestmark = pytest.mark.engine
HELD_OUT = 6
HELD_OUT_TOKENS = 48  # past the first 128-token KV block, so the small cache must preempt
THINKING = 8
V2_THINKING_TOKENS = 96
assert V2_THINKING_TOKENS <= THINKING_TOKENS
SEEDED = {"temperature": 0.8, "seed": 1234, "max_tokens": 24}
TOPK, DELTA = 10, 0.6
SPEC = {**mtp_config(3), "vllm_mtp_gemma4": {"relaxed_topk": TOPK, "relaxed_delta": DELTA}}


@pytest.fixture(scope="module")
def v2_strict(held_out_prompts) -> JobResult:
    prompts = held_out_prompts[:HELD_OUT] + thinking_prompts()[:THINKING]
    sampling = ([{"temperature": 0.0, "max_tokens": HELD_OUT_TOKENS}] * HELD_OUT
                + [{"temperature": 0.0, "max_tokens": V2_THINKING_TOKENS}] * THINKING)
    engine = {**ENGINE, "speculative_config": SPEC, "max_num_batched_tokens": 64, "enable_chunked_prefill": True,
              "max_model_len": 384, "num_gpu_blocks_override": 14}
    return run_job(Job(engine=engine, prompts=prompts, sampling=sampling, env=V2_ENV))


@pytest.fixture(scope="module")
def v2_relaxed(held_out_prompts) -> JobResult:
    prompts = [held_out_prompts[9]] + thinking_prompts()[:THINKING] + [held_out_prompts[9]]
    relaxed = {"temperature": 0.0, "max_tokens": V2_THINKING_TOKENS, "extra_args": {"relaxed_acceptance": True}}
    engine = {**ENGINE, "speculative_config": SPEC, "max_num_batched_tokens": 32, "enable_chunked_prefill": True}
    return run_job(Job(engine=engine, prompts=prompts, sampling=[SEEDED] + [relaxed] * THINKING + [SEEDED],
                       env=V2_ENV))


@pytest.fixture(scope="module")
def upstream_v2_seeded(held_out_prompts) -> JobResult:
    return run_job(Job(engine={**ENGINE, "speculative_config": mtp_config(3)}, prompts=[held_out_prompts[9]],
                       sampling=SEEDED, env=V2_ENV, plugins=False))


def phase_length(result: JobResult, phase: str) -> float:
    steps = result.metrics[f"vllm:mtp_gemma4_spec_steps{{phase={phase}}}"]
    assert steps > 0, f"no speculative steps in the {phase} phase"
    return 1 + result.metrics[f"vllm:mtp_gemma4_accepted_tokens{{phase={phase}}}"] / steps


def test_v2_runs_the_plugin_not_the_v1_runner(v2_strict):
    log = v2_strict.log
    assert "Using V2 Model Runner" in log
    assert "vllm-mtp-gemma4: Model Runner V2" in log and "fused step: off (V2's own step)" in log
    assert "vllm_mtp_gemma4.models.gemma4_mtp.Gemma4MTP loaded: projections replicated" in log
    assert "relaxed acceptance on Model Runner V2" in log
    assert "Gemma4MTPProposer" not in log and "fused target-verify step on" not in log  # V1's pieces
    info = "vllm:mtp_gemma4_proposer_info"  # reported by the worker that drafts
    assert v2_strict.metrics.get(f"{info}{{runner=V2}}") == 1
    assert v2_strict.metrics.get(f"{info}{{drafter=Gemma4Speculator}}") == 1
    assert v2_strict.metrics.get(f"{info}{{assistant=vllm_mtp_gemma4.models.gemma4_mtp.Gemma4MTP}}") == 1


def test_v2_greedy_is_token_identical_with_chunked_prefill_and_preemption(v2_strict, plain_greedy, plain_thinking):
    assert v2_strict.metrics.get("vllm:num_preemptions", 0) > 0, "the small cache did not preempt"
    held_out = v2_strict.token_ids[:HELD_OUT]
    assert held_out == [t[:HELD_OUT_TOKENS] for t in plain_greedy.token_ids[:HELD_OUT]]
    thinking = v2_strict.token_ids[HELD_OUT:HELD_OUT + THINKING]
    assert thinking == [t[:V2_THINKING_TOKENS] for t in plain_thinking.token_ids[:THINKING]]
    assert v2_strict.spec.mean_acceptance_length > 1.5


def test_v2_seeded_sampling_does_not_depend_on_the_batch_and_stays_v2s(v2_relaxed, upstream_v2_seeded):
    """A seeded sampled request first and last in a batch of relaxed ones, and alone on upstream V2: the same tokens,
    so the plugin leaves V2's own sampling (Gumbel noise keyed by seed and position) as it is outside thinking."""
    first, last = v2_relaxed.token_ids[0], v2_relaxed.token_ids[-1]
    assert first == last == upstream_v2_seeded.token_ids[0]
    assert len(set(first)) > 3


def test_v2_phase_metrics_agree_with_the_tokens(v2_strict, v2_relaxed):
    """Every committed token after a request's first is one speculative step's, accepted or not."""
    for result in (v2_strict, v2_relaxed):
        counted = sum(result.metrics[f"vllm:mtp_gemma4_{name}{{phase={phase}}}"]
                      for name in ("spec_steps", "accepted_tokens") for phase in ("thinking", "answer"))
        assert counted == result.generated_tokens - len(result.token_ids)
        # vLLM counts accepted drafts before max_tokens or a stop cuts a step's tokens: never fewer.
        ours = sum(result.metrics[f"vllm:mtp_gemma4_accepted_tokens{{phase={phase}}}"]
                   for phase in ("thinking", "answer"))
        assert 0 < ours <= result.spec.num_accepted_tokens


def test_v2_relaxed_acceptance_is_longer_inside_thinking(v2_strict, v2_relaxed):
    strict, relaxed = phase_length(v2_strict, "thinking"), phase_length(v2_relaxed, "thinking")
    print(f"\nV2 mean acceptance length inside thinking: strict {strict:.3f}, relaxed {relaxed:.3f}")
    assert relaxed > strict + 0.1
    assert v2_relaxed.token_ids[1:-1] != v2_strict.token_ids[HELD_OUT:HELD_OUT + THINKING]


def test_v2_relaxed_tokens_obey_the_rule(v2_relaxed):
    prompts, outputs = thinking_prompts()[:THINKING], v2_relaxed.token_ids[1:-1]
    relaxed_only = assert_tokens_obey_the_rule(prompts, outputs, score(prompts, outputs), TOPK, DELTA)
    assert relaxed_only > 0, "no token needed the relaxed rule"


def test_v2_tp2_greedy_is_token_identical_with_the_local_argmax(held_out_prompts, plain_greedy):
    """TP=2 (``mp``, one core per rank) on V2: the plugin turns ``use_local_argmax_reduction`` on, so V2's
    speculator drafts through the plugin's assistant's ``get_top_tokens`` (vLLM's asserts on a dense head)."""
    result = run_job(Job(engine={**ENGINE, "speculative_config": SPEC, "tensor_parallel_size": 2,
                                 "distributed_executor_backend": "mp"},
                         prompts=held_out_prompts[:4], sampling={"temperature": 0.0, "max_tokens": 32},
                         env={**V2_ENV, "VLLM_CPU_OMP_THREADS_BIND": "0|1"}))
    assert "Using V2 Model Runner" in result.log and "draft argmax: vocab-parallel local" in result.log
    assert "Using local argmax reduction for draft token generation" in result.log
    assert result.token_ids == [t[:32] for t in plain_greedy.token_ids[:4]]
    assert result.spec.mean_acceptance_length > 1.5
