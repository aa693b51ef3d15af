"""Relaxed acceptance inside Gemma 4's thinking phase, end to end on the fixture.

Greedy requests opt in per request (``extra_args``), so every figure is deterministic:
- inside thinking, mean acceptance length is higher relaxed than strict (both figures printed);
- answers stay strict: given the same thinking prefix, the answer continuation is token-identical with and without
  relaxed acceptance, and equal to plain decoding's;
- the phase split is what ``/metrics`` and ``LLM.get_metrics()`` show.
"""

from __future__ import annotations

import pytest

from vllm_mtp_gemma4.bench.job import Job, JobResult, run_job

from .conftest import ENGINE, THINKING_TOKENS, close_id, mtp_config, thinking_prompts
from .relaxed_rule import assert_tokens_obey_the_rule, score

pytestmark = pytest.mark.engine

SPEC = {**mtp_config(3), "vllm_mtp_gemma4": {"relaxed_topk": 10, "relaxed_delta": 0.6}}
RELAXED = {"relaxed_acceptance": True}


def _run(prompts: list[list[int]], sampling: list[dict], spec: dict | None = SPEC) -> JobResult:
    engine = ENGINE if spec is None else {**ENGINE, "speculative_config": spec}
    return run_job(Job(engine=engine, prompts=prompts, sampling=sampling))


def phase_length(result: JobResult, phase: str) -> float:
    """Mean acceptance length in a phase, from the plugin's phase-split metrics."""
    steps = result.metrics[f"vllm:mtp_gemma4_spec_steps{{phase={phase}}}"]
    accepted = result.metrics[f"vllm:mtp_gemma4_accepted_tokens{{phase={phase}}}"]
    assert steps > 0, f"no speculative steps in the {phase} phase"
    return 1 + accepted / steps


@pytest.fixture(scope="module")
def strict_and_relaxed() -> tuple[JobResult, JobResult]:
    prompts = thinking_prompts()
    greedy = {"temperature": 0.0, "max_tokens": THINKING_TOKENS}
    strict = _run(prompts, [greedy] * len(prompts))
    relaxed = _run(prompts, [{**greedy, "extra_args": RELAXED}] * len(prompts))
    return strict, relaxed


def test_relaxed_acceptance_is_longer_inside_thinking(strict_and_relaxed, record_property):
    strict, relaxed = strict_and_relaxed
    figures = {f"{mode} {phase}": round(phase_length(result, phase), 3)
               for mode, result in (("strict", strict), ("relaxed", relaxed)) for phase in ("thinking", "answer")}
    print(f"\nmean acceptance length: {figures}")
    record_property("acceptance_length", figures)
    assert figures["relaxed thinking"] > figures["strict thinking"] + 0.1
    assert relaxed.token_ids != strict.token_ids, "relaxed acceptance changed nothing"


def test_relaxed_tokens_obey_the_rule(strict_and_relaxed):
    _, relaxed = strict_and_relaxed
    prompts = thinking_prompts()
    relaxed_only = assert_tokens_obey_the_rule(prompts, relaxed.token_ids, score(prompts, relaxed.token_ids),
                                               SPEC["vllm_mtp_gemma4"]["relaxed_topk"],
                                               SPEC["vllm_mtp_gemma4"]["relaxed_delta"])
    assert relaxed_only > 0, "no token needed the relaxed rule"


def test_strict_mode_matches_plain_decoding(strict_and_relaxed, plain_thinking):
    strict, _ = strict_and_relaxed
    assert strict.token_ids == plain_thinking.token_ids


def test_phase_counters_against_vllms(strict_and_relaxed):
    """The phase counters count committed tokens: every token after a request's first is one step's; vLLM's
    accepted-draft counter also counts drafts that max_tokens or a stop cut off, so it is never smaller."""
    for result in strict_and_relaxed:
        steps, accepted = (sum(result.metrics[f"vllm:mtp_gemma4_{name}{{phase={phase}}}"]
                               for phase in ("thinking", "answer")) for name in ("spec_steps", "accepted_tokens"))
        assert steps + accepted == result.generated_tokens - len(result.token_ids)
        assert 0 < accepted <= result.spec.num_accepted_tokens


def test_answers_after_a_relaxed_thinking_prefix_stay_strict(strict_and_relaxed):
    """Prompt + the relaxed run's thinking up to its closing marker, then continue: relaxed-opted-in requests,
    strict requests and plain decoding write the same answer."""
    _, relaxed = strict_and_relaxed
    end = close_id()
    prefixes = [prompt + out[:out.index(end) + 1]
                for prompt, out in zip(thinking_prompts(), relaxed.token_ids) if end in out]
    assert len(prefixes) >= 4, "too few relaxed responses closed their thinking block"
    greedy = {"temperature": 0.0, "max_tokens": 64}
    both = _run(prefixes * 2, [{**greedy, "extra_args": RELAXED}] * len(prefixes) + [greedy] * len(prefixes))
    plain = _run(prefixes, [greedy] * len(prefixes), spec=None)
    opted_in, strict = both.token_ids[:len(prefixes)], both.token_ids[len(prefixes):]
    assert opted_in == strict == plain.token_ids
    assert both.metrics["vllm:mtp_gemma4_spec_steps{phase=answer}"] > 0
