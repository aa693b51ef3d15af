"""The plugin on Model Runner V2, vLLM's default on CUDA, run here on CPU through Triton's interpreter.

``tests/mrv2/sitecustomize.py`` switches every process of a job to V2 (``conftest.V2_ENV``). The interpreter runs
each Triton kernel in Python, so these are correctness runs on a few short requests; their timings mean nothing.
Two engines serve every test here:
- ``v2_strict``: greedy held-out and thinking prompts, and the thinking prompts again opted in to relaxed
  acceptance, with chunked prefill (a 64-token budget) and a cache small enough to preempt;
- ``v2_relaxed``, relaxed acceptance on by config (so for every sampled request): the thinking prompts opted in
  (greedy) without preemption, one of them again with a stop id that the relaxed rule would otherwise accept,
  sampled thinking prompts, prompts whose thinking block closed in the prompt, a long thinking context, and two
  copies of a seeded request without thinking; a 32-token prefill budget (every prompt prefills in chunks);
and one upstream V2 run (plugins off) of the sampled requests, and one TP=2 run.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from dataclasses import replace

import pytest
from transformers import AutoTokenizer

from vllm_mtp_gemma4.bench.job import Job, JobResult, run_job
from vllm_mtp_gemma4.config import THINKING_CLOSE, THINKING_OPEN
from vllm_mtp_gemma4.ops import thinking_after
from vllm_mtp_gemma4.worker.v2 import RELAXED_PROCESSOR

from .conftest import (
    ASSISTANT_CENTROIDS,
    ENGINE,
    MULTIPROCESS,
    TARGET,
    THINKING_TOKENS,
    V2_ENV,
    mtp_config,
    thinking_prompts,
)
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
RELAXED_BY_CONFIG = {**mtp_config(3),
                     "vllm_mtp_gemma4": {"relaxed_acceptance": True, "relaxed_topk": TOPK, "relaxed_delta": DELTA}}
OPT_IN = {"temperature": 0.0, "max_tokens": V2_THINKING_TOKENS, "extra_args": {"relaxed_acceptance": True}}
SAMPLED_THINKING, ANSWERING = 4, 2  # sampled requests that think, and ones whose thinking closed in the prompt
LONG_CONTEXT = 1500  # tokens of thinking before the first draft (the fixture's max_model_len is 2048)
PER_REQUEST_METRICS = {"per_request_spec_decode_metrics": "detailed"}  # per-step accepted counts


def markers() -> tuple[int, int]:
    tok = AutoTokenizer.from_pretrained(TARGET)
    return tok.convert_tokens_to_ids(THINKING_OPEN), tok.convert_tokens_to_ids(THINKING_CLOSE)


def sampled_requests(held_out_prompts) -> tuple[list[list[int]] | list[str], list[dict]]:
    """What both ``v2_relaxed`` and upstream V2 run sampled: a seeded request without thinking, sampled thinking
    prompts, and prompts whose thinking block opened and closed in the prompt (their answer is sampled)."""
    tok = AutoTokenizer.from_pretrained(TARGET)
    open_id, close_id = markers()
    thought = tok("The user wants a short function; write it plainly.", add_special_tokens=False).input_ids
    answering = [p + [open_id, *thought, close_id] for p in thinking_prompts()[12:12 + ANSWERING]]
    prompts = ([tok(held_out_prompts[9]).input_ids] + thinking_prompts()[THINKING:THINKING + SAMPLED_THINKING]
               + answering)
    sampling = ([SEEDED] + [{"temperature": 0.8, "seed": 100 + i, "max_tokens": 64} for i in range(SAMPLED_THINKING)]
                + [{"temperature": 0.8, "seed": 200 + i, "max_tokens": 24} for i in range(ANSWERING)])
    return prompts, sampling


def long_thinking_prompt(held_out_prompts) -> list[int]:
    """A thinking prompt followed by ``LONG_CONTEXT`` tokens of text inside its open thinking block."""
    tok = AutoTokenizer.from_pretrained(TARGET)
    filler = [t for text in held_out_prompts for t in tok(text, add_special_tokens=False).input_ids]
    prompt = thinking_prompts()[0]
    assert markers()[0] in prompt, "the thinking prompts open their block in the prompt"
    return prompt + filler[:LONG_CONTEXT]


@pytest.fixture(scope="module")
def v2_strict(held_out_prompts) -> JobResult:
    prompts = held_out_prompts[:HELD_OUT] + thinking_prompts()[:THINKING] * 2
    sampling = ([{"temperature": 0.0, "max_tokens": HELD_OUT_TOKENS}] * HELD_OUT
                + [{"temperature": 0.0, "max_tokens": V2_THINKING_TOKENS}] * THINKING + [OPT_IN] * THINKING)
    engine = {**ENGINE, "speculative_config": SPEC, "max_num_batched_tokens": 64, "enable_chunked_prefill": True,
              "max_model_len": 384, "num_gpu_blocks_override": 14, **PER_REQUEST_METRICS}
    return run_job(Job(engine=engine, prompts=prompts, sampling=sampling, env=V2_ENV))


def first_relaxed_token(v2_strict: JobResult) -> tuple[int, int, int]:
    """(prompt, position, token) where the strict and relaxed outputs of a thinking prompt first part: the relaxed
    rule accepted a draft there that is not the target's argmax (the strict output's token)."""
    strict = v2_strict.token_ids[HELD_OUT:HELD_OUT + THINKING]
    relaxed = v2_strict.token_ids[HELD_OUT + THINKING:]
    for i, (s, r) in enumerate(zip(strict, relaxed)):
        parted = next((p for p, (a, b) in enumerate(zip(s, r)) if a != b), None)
        if parted is not None and r[parted] not in markers():
            return i, parted, r[parted]
    raise AssertionError("relaxed acceptance changed no thinking prompt's output")


@pytest.fixture(scope="module")
def v2_relaxed(held_out_prompts, v2_strict) -> JobResult:
    prompt, _, token = first_relaxed_token(v2_strict)
    stop_at = {**OPT_IN, "stop_token_ids": [token]}
    sampled_prompts, sampled = sampled_requests(held_out_prompts)
    prompts = (sampled_prompts[:1] + thinking_prompts()[:THINKING] + [thinking_prompts()[prompt]]
               + sampled_prompts[1:] + [long_thinking_prompt(held_out_prompts)] + sampled_prompts[:1])
    sampling = ([SEEDED] + [OPT_IN] * THINKING + [stop_at] + sampled[1:] + [{**OPT_IN, "max_tokens": 32}]
                + [SEEDED])
    engine = {**ENGINE, "speculative_config": RELAXED_BY_CONFIG, "max_num_batched_tokens": 32,
              "enable_chunked_prefill": True, **PER_REQUEST_METRICS}
    return run_job(Job(engine=engine, prompts=prompts, sampling=sampling, env=V2_ENV))


# Requests of ``v2_relaxed``, by place.
OPTED_IN = slice(1, 1 + THINKING)
STOP_ID = 1 + THINKING
SAMPLED = slice(STOP_ID + 1, STOP_ID + 1 + SAMPLED_THINKING)
ANSWERS = slice(SAMPLED.stop, SAMPLED.stop + ANSWERING)
LONG = ANSWERS.stop


@pytest.fixture(scope="module")
def upstream_v2_sampled(held_out_prompts) -> JobResult:
    prompts, sampling = sampled_requests(held_out_prompts)
    return run_job(Job(engine={**ENGINE, "speculative_config": mtp_config(3), **PER_REQUEST_METRICS},
                       prompts=prompts, sampling=sampling, env=V2_ENV, plugins=False))


def mean_acceptance(result: JobResult, requests: slice | list[int]) -> float:
    chosen = result.request_spec[requests] if isinstance(requests, slice) else [result.request_spec[i]
                                                                                for i in requests]
    return statistics.mean(r["mean_acceptance_length"] for r in chosen)


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


def test_v2_relaxed_thinking_is_the_same_across_preemption(v2_strict, v2_relaxed):
    """The opted-in thinking prompts in ``v2_strict``, whose small cache preempts, against the same requests in
    ``v2_relaxed``, whose cache does not: each request's thinking state is rebuilt at resumption and advanced from
    what it commits, so relaxed acceptance makes the same choices."""
    assert v2_strict.metrics.get("vllm:num_preemptions", 0) > 0
    assert v2_relaxed.metrics.get("vllm:num_preemptions", 0) == 0
    assert v2_strict.token_ids[HELD_OUT + THINKING:] == v2_relaxed.token_ids[OPTED_IN]


def test_v2_seeded_sampling_outside_thinking_is_v2s_own(v2_relaxed, upstream_v2_sampled):
    """Relaxed acceptance on by config, so for every sampled request here. A seeded request without thinking, first
    and last in the batch, and seeded requests whose thinking block closed in the prompt: the same tokens as on
    upstream V2 (plugins off), so the plugin leaves V2's own sampling (Gumbel noise keyed by seed and position)
    exactly as it is outside thinking. Equal tokens under the same noise is a stronger check than a test of their
    distribution."""
    first, last = v2_relaxed.token_ids[0], v2_relaxed.token_ids[-1]
    assert first == last == upstream_v2_sampled.token_ids[0]
    assert len(set(first)) > 3
    assert v2_relaxed.token_ids[ANSWERS] == upstream_v2_sampled.token_ids[1 + SAMPLED_THINKING:]


def test_v2_sampled_relaxed_rows_accept_more_inside_thinking(v2_relaxed, upstream_v2_sampled):
    """Sampled thinking requests (T = 0.8, seeded), relaxed by the config's flag, against the same requests on
    upstream V2: longer acceptance (vLLM's own per-request figures)."""
    relaxed = mean_acceptance(v2_relaxed, SAMPLED)
    strict = mean_acceptance(upstream_v2_sampled, slice(1, 1 + SAMPLED_THINKING))
    print(f"\nV2 sampled thinking, mean acceptance length: upstream {strict:.3f}, relaxed by config {relaxed:.3f}")
    assert relaxed > strict + 0.1


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


def thinking_acceptance(result: JobResult, requests: range, prompts: list[list[int]]) -> float:
    """Mean acceptance length over the steps that began inside thinking, from vLLM's per-step accepted counts of
    each request (``detailed``): its first token comes from the prefill, then step i commits accepted_i + 1."""
    open_id, close_id = markers()
    steps = accepted = 0
    for request, prompt in zip(requests, prompts):
        output, position = result.token_ids[request], 1
        for count in result.request_spec[request]["per_step_accepted"]:
            if thinking_after(False, prompt + output[:position], open_id, close_id):
                steps, accepted = steps + 1, accepted + count
            position += count + 1
    return 1 + accepted / steps


def test_v2_relaxed_acceptance_is_longer_inside_thinking(v2_strict, v2_relaxed):
    prompts = thinking_prompts()[:THINKING]
    strict = thinking_acceptance(v2_strict, range(HELD_OUT, HELD_OUT + THINKING), prompts)
    relaxed = thinking_acceptance(v2_relaxed, range(OPTED_IN.start, OPTED_IN.stop), prompts)
    print(f"\nV2 mean acceptance length inside thinking (greedy): strict {strict:.3f}, relaxed {relaxed:.3f}")
    assert relaxed > strict + 0.1
    assert v2_relaxed.token_ids[OPTED_IN] != v2_strict.token_ids[HELD_OUT:HELD_OUT + THINKING]


def test_v2_relaxed_tokens_obey_the_rule_at_short_and_long_contexts(v2_relaxed, held_out_prompts):
    """Audited against the target's raw log-probabilities, the opted-in thinking prompts and a thinking block
    opened 1,500 tokens before the first draft: the state that admission reads from the prompt holds there."""
    prompts = thinking_prompts()[:THINKING] + [long_thinking_prompt(held_out_prompts)]
    outputs = v2_relaxed.token_ids[OPTED_IN] + [v2_relaxed.token_ids[LONG]]
    scored = score(prompts, outputs)
    assert assert_tokens_obey_the_rule(prompts[:-1], outputs[:-1], scored, TOPK, DELTA) > 0
    long_only = assert_tokens_obey_the_rule(prompts[-1:], outputs[-1:],
                                            replace(scored, prompt_logprobs=scored.prompt_logprobs[-1:]), TOPK, DELTA)
    assert long_only > 0, "no relaxed acceptance 1,500 tokens into a thinking block"


def test_v2_a_request_stop_id_is_accepted_only_strictly(v2_strict, v2_relaxed):
    """A stop id of the request's own (not the model's EOS) that the relaxed rule accepted as a draft in the same
    request without it (the control): with it, the target's argmax is emitted there instead, so relaxation never
    ends a response early."""
    prompt, position, token = first_relaxed_token(v2_strict)
    control, stopped = v2_relaxed.token_ids[OPTED_IN][prompt], v2_relaxed.token_ids[STOP_ID]
    assert control[position] == token, "the control did not take the relaxed draft where v2_strict did"
    assert stopped[:position] == control[:position]
    assert stopped[position:position + 1] == v2_strict.token_ids[HELD_OUT + prompt][position:position + 1]
    assert token not in stopped or stopped[-1] == token and v2_relaxed.stop_reasons[STOP_ID] == token


def test_v2_tp2_greedy_is_token_identical_with_the_local_argmax(held_out_prompts, plain_greedy):
    """TP=2 (``mp``, one core per rank) on V2: the plugin turns ``use_local_argmax_reduction`` on, so V2's
    speculator drafts through the plugin's assistant's ``get_top_tokens`` (vLLM's asserts on a dense head)."""
    result = run_job(Job(engine={**ENGINE, "speculative_config": SPEC, "tensor_parallel_size": 2,
                                 "distributed_executor_backend": "mp"},
                         prompts=held_out_prompts[:4], sampling={"temperature": 0.0, "max_tokens": 32},
                         env={**V2_ENV, **MULTIPROCESS, "VLLM_CPU_OMP_THREADS_BIND": "0|1"}))
    assert "Using V2 Model Runner" in result.log and "draft argmax: vocab-parallel local" in result.log
    assert "Using local argmax reduction for draft token generation" in result.log
    assert result.token_ids == [t[:32] for t in plain_greedy.token_ids[:4]]
    assert result.spec.mean_acceptance_length > 1.5


V2_CONFIG_PROBE = """
import json, sys
from vllm.engine.arg_utils import EngineArgs
from vllm_mtp_gemma4.config import MTPConfigError
for engine in json.loads(sys.argv[1]):
    try:
        config = EngineArgs(**engine).create_engine_config()
    except MTPConfigError as e:
        print("PROBE", json.dumps({"error": str(e)}), flush=True)
        continue
    print("PROBE", json.dumps({"v2": config.use_v2_model_runner,
                               "local_argmax": config.speculative_config.use_local_argmax_reduction,
                               "processors": config.model_config.logits_processors or []}), flush=True)
"""
CENTROIDS, DENSE, REFUSED, UNAVAILABLE = range(4)


@pytest.fixture(scope="module")
def v2_configs() -> tuple[list[dict], str]:
    """Configs resolved on V2 in one process (no weights loaded): a centroid-masked assistant, a dense one, and
    processed logprobs with relaxed acceptance on by config, and without."""
    relaxed = {**mtp_config(3), "vllm_mtp_gemma4": {"relaxed_acceptance": True}}
    engines = [{**ENGINE, "speculative_config": mtp_config(3, ASSISTANT_CENTROIDS)},
               {**ENGINE, "speculative_config": mtp_config(3)},
               {**ENGINE, "speculative_config": relaxed, "logprobs_mode": "processed_logprobs"},
               {**ENGINE, "speculative_config": mtp_config(3), "logprobs_mode": "processed_logprobs"}]
    proc = subprocess.run([sys.executable, "-c", V2_CONFIG_PROBE, json.dumps(engines)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, **V2_ENV})
    results = [json.loads(line[6:]) for line in proc.stdout.splitlines() if line.startswith("PROBE ")]
    assert len(results) == len(engines), proc.stdout + proc.stderr
    return results, proc.stdout + proc.stderr


def test_v2_centroid_head_drafts_by_its_sparse_argmax_at_tp1(v2_configs):
    """A centroid-masked assistant (E2B/E4B) at TP=1 on V2: ``use_local_argmax_reduction`` is on, so V2's speculator
    calls the head's sparse argmax; a dense one keeps V2's own path."""
    configs, _ = v2_configs
    assert configs[CENTROIDS]["v2"] and configs[CENTROIDS]["local_argmax"] and not configs[DENSE]["local_argmax"]
    assert RELAXED_PROCESSOR in configs[CENTROIDS]["processors"]


def test_v2_refuses_relaxed_acceptance_where_its_forced_logits_would_show(v2_configs):
    """Processed logprobs would report a forced draft's p ~ 1: relaxed acceptance on by config is one start error
    naming both settings; without the flag the engine starts with relaxed acceptance unavailable (requests that ask
    for it get a 400) and V2's logits untouched."""
    configs, output = v2_configs
    assert configs[REFUSED]["error"] == (
        "vllm_mtp_gemma4.relaxed_acceptance: on Model Runner V2 it raises accepted drafts' logits, which "
        "--logprobs-mode processed_logprobs would expose; drop one of them")
    assert configs[UNAVAILABLE]["v2"] and RELAXED_PROCESSOR not in configs[UNAVAILABLE]["processors"]
    assert "relaxed acceptance: unavailable (--logprobs-mode processed_logprobs)" in output


@pytest.mark.scale  # two interpreted engines; the config that turns it on is checked in the default suite
def test_v2_centroid_head_sparse_argmax_drafts_what_the_dense_scatter_does(held_out_prompts, plain_greedy):
    """The plugin (sparse argmax over the top centroids' tokens) against upstream V2 at TP=1 (the centroid scores
    scattered into full-vocabulary logits, then an argmax): the same tokens as plain decoding, and the same accepted
    drafts at every position, so the same drafts."""
    job = {"engine": {**ENGINE, "speculative_config": mtp_config(3, ASSISTANT_CENTROIDS)},
           "prompts": held_out_prompts[:4], "sampling": {"temperature": 0.0, "max_tokens": 24}, "env": V2_ENV}
    plugin, upstream = run_job(Job(**job)), run_job(Job(**job, plugins=False))
    assert "draft argmax: vocab-parallel local" in plugin.log
    assert "Using local argmax reduction" in plugin.log and "Using local argmax reduction" not in upstream.log
    assert plugin.token_ids == upstream.token_ids == [t[:24] for t in plain_greedy.token_ids[:4]]
    assert plugin.spec.accepted_per_pos == upstream.spec.accepted_per_pos
    assert plugin.spec.num_accepted_tokens > 0
