"""What a user sets beyond plain sampling, honoured by the fused step (V1) or refused at start, end to end:

- ``rejection_sample_method: "synthetic"`` (vLLM's spelling, with ``synthetic_acceptance_rates``): the measured
  per-position acceptance is the configured rate; any other method than "standard" and "synthetic" is one start
  error naming it;
- a per-request draft cap (``extra_args["num_speculative_tokens"]``, ``vllm_xargs`` over HTTP): 0 sends no drafts,
  1 at most one, and the text stays plain decoding's; a bad value is an admission error naming the key;
- per-request stop ids are strict-only: relaxed acceptance never accepts a request's own ``stop_token_ids``
  inside thinking, although it would accept the same token for a request without it.
"""

from __future__ import annotations

import pytest
from vllm.engine.arg_utils import EngineArgs

from vllm_mtp_gemma4.bench.job import Job, JobResult, run_job
from vllm_mtp_gemma4.config import DRAFT_CAP_KEY, SECTION, MTPConfigError, PluginConfig, check_draft_cap

from .conftest import ENGINE, GREEDY_TOKENS, mtp_config, thinking_prompts

# Gemma 4 26B-A4B's published per-position acceptance at K=4 (the first three; issue 25 cites the model card).
RATES = [0.844, 0.599, 0.385]
SYNTHETIC_SPEC = {**mtp_config(3), "rejection_sample_method": "synthetic", "synthetic_acceptance_rates": RATES,
                  SECTION: {}}
SYNTHETIC_TOKENS = 120
# Each position's rate is estimated from about 680 drafting steps (16 requests x 120 tokens / 2.8 tokens a step):
# a binomial standard error of at most 0.019, so 0.06 is more than 3 of them (a correct implementation fails with
# chance below 0.3 % per position). The draws are seeded, so the run itself is the same every time.
RATE_TOLERANCE = 0.06


# ---------------------------------------------------------------- start errors (no engine)


@pytest.mark.parametrize("method", ["block", "fly"])  # "fly": vLLM 0.33's lossy method
def test_rejection_methods_the_fused_step_cannot_honour_are_refused(method):
    with pytest.raises(MTPConfigError, match=f"^speculative config 'rejection_sample_method': '{method}' is not "
                                             f"available with the plugin's fused step"):
        PluginConfig().for_runner("V1", method)
    assert PluginConfig(fused=False).for_runner("V1", method).fused is False  # vLLM's own step takes it
    assert PluginConfig().for_runner("V1", "synthetic").fused is True


def test_a_block_verification_engine_is_refused_before_weights_load():
    args = EngineArgs(**ENGINE, speculative_config={**mtp_config(3), "rejection_sample_method": "block"})
    with pytest.raises(MTPConfigError, match="'block' is not available with the plugin's fused step"):
        args.create_engine_config()


def test_synthetic_with_relaxed_acceptance_is_refused():
    with pytest.raises(MTPConfigError, match=f"^{SECTION}.relaxed_acceptance: not with 'rejection_sample_method'"):
        PluginConfig(relaxed_acceptance=True).for_runner("V1", "synthetic")


@pytest.mark.parametrize("cap", [-1, 1.5, "2", True])
def test_a_bad_draft_cap_is_refused_naming_it(cap):
    with pytest.raises(MTPConfigError, match=f"^vllm_xargs.{DRAFT_CAP_KEY}: must be an integer >= 0"):
        check_draft_cap({DRAFT_CAP_KEY: cap}, None)


def test_runners_that_cannot_cap_drafts_refuse_the_key():
    check_draft_cap({DRAFT_CAP_KEY: 0}, None)
    check_draft_cap({"other": 1}, "not available")
    with pytest.raises(MTPConfigError, match=f"^vllm_xargs.{DRAFT_CAP_KEY}: not available on Model Runner V2"):
        check_draft_cap({DRAFT_CAP_KEY: 2}, "not available on Model Runner V2")


# ---------------------------------------------------------------- engines


@pytest.mark.engine
def test_synthetic_acceptance_matches_the_configured_rates(held_out_prompts):
    prompts = held_out_prompts[:16]
    sampling = [{"temperature": 0.0, "max_tokens": SYNTHETIC_TOKENS, "ignore_eos": True, "seed": i}
                for i in range(len(prompts))]
    result = run_job(Job(engine={**ENGINE, "speculative_config": SYNTHETIC_SPEC}, prompts=prompts, sampling=sampling))
    measured = result.spec.acceptance_rate_per_pos
    print(f"\nsynthetic acceptance per position: measured {[round(r, 3) for r in measured]}, configured {RATES} "
          f"({result.spec.num_drafts} drafting steps)")
    assert result.spec.num_drafts > 550
    for position, (got, want) in enumerate(zip(measured, RATES, strict=True)):
        assert abs(got - want) < RATE_TOLERANCE, f"position {position + 1}: {got:.3f} against {want}"
    assert "NOT lossless" in result.log


@pytest.fixture(scope="module")
def capped_run(held_out_prompts) -> JobResult:
    """Greedy requests capped at 0 drafts and at 1, in one batch, on a K=3 engine."""
    prompts = held_out_prompts[:8]
    sampling = [{"temperature": 0.0, "max_tokens": GREEDY_TOKENS, "extra_args": {DRAFT_CAP_KEY: i % 2}}
                for i in range(len(prompts))]
    return run_job(Job(engine={**ENGINE, "speculative_config": {**mtp_config(3), SECTION: {}}}, prompts=prompts,
                       sampling=sampling))


@pytest.mark.engine
def test_draft_caps_limit_drafts_and_keep_the_text(capped_run, plain_greedy):
    assert capped_run.token_ids == [t[:GREEDY_TOKENS] for t in plain_greedy.token_ids[:8]]
    spec = capped_run.spec
    # Only the rows capped at 1 drafted, one draft a step; rows capped at 0 never drafted.
    assert spec.num_drafts > 0 and spec.num_draft_tokens == spec.num_drafts
    assert spec.accepted_per_pos[0] > 0 and not any(spec.accepted_per_pos[1:])


# A token the relaxed rule accepts inside the fixture's thinking where it is not the argmax: ' from' (id 408), as the
# 4th token of the relaxed greedy responses to thinking prompts 5, 8, 9, 10, 14 and 15 (and nowhere before).
STOP_ID = 408
STOP_PROMPTS = [5, 8, 9, 10, 14, 15]
RELAXED_SPEC = {**mtp_config(3), SECTION: {"relaxed_topk": 10, "relaxed_delta": 0.6}}


def _relaxed_only(output: list[int], logprobs: list[dict[int, float]], token: int) -> list[int]:
    """Positions where ``token`` was committed although it was not the target's argmax (a relaxed acceptance)."""
    return [i for i, (t, top) in enumerate(zip(output, logprobs)) if t == token and top[t] < max(top.values()) - 1e-6]


@pytest.mark.engine
def test_a_requests_own_stop_id_is_never_relaxed():
    """The same thinking prompts, relaxed and greedy, in one batch: without a stop id the relaxed rule commits ' from'
    where it is not the argmax; with ``stop_token_ids=[' from']`` (not the model's EOS) it never does."""
    prompts = [thinking_prompts()[i] for i in STOP_PROMPTS]
    relaxed = {"temperature": 0.0, "max_tokens": 16, "logprobs": 1,
               "extra_args": {"relaxed_acceptance": True}}
    result = run_job(Job(engine={**ENGINE, "speculative_config": RELAXED_SPEC}, prompts=prompts * 2,
                         sampling=[relaxed] * len(prompts) + [{**relaxed, "stop_token_ids": [STOP_ID]}] * len(prompts)))
    n = len(prompts)
    free = [_relaxed_only(out, lp, STOP_ID) for out, lp in zip(result.token_ids[:n], result.logprobs[:n])]
    stopped = [_relaxed_only(out, lp, STOP_ID) for out, lp in zip(result.token_ids[n:], result.logprobs[n:])]
    assert sum(map(bool, free)) >= 3, f"the relaxed rule never took {STOP_ID}: the test could not fail"
    assert not any(stopped), f"a request's own stop id was accepted by the relaxed rule: {stopped}"
    assert all(result.token_ids[i] != result.token_ids[n + i] for i in range(n) if free[i])
