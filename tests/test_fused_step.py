"""The fused target-verify step on the real engine and fixture pair.

- one device-to-host read per step, counted by intercepting every torch call of the step
  (``worker/host_reads.py``), read through ``LLM.collective_rpc``;
- sampled output is distributed like plain sampling (a two-sample chi-square over 3,000 continuations a side, with
  its power stated), and the same test rejects upstream vLLM's CPU sampler, the bug it is meant to catch; so is output
  with ``repetition_penalty``, ``logit_bias`` (on a token of the prompt) and ``min_p`` together, where applying the
  bias after the penalty instead of before it, as vLLM's sampler does, changes the distribution;
- a seeded request gives the same tokens whatever else is in its batch, wherever it sits, and when preempted or
  chunked (where upstream's engine dies: "CPU Generator does not use offset");
- logprobs are the target's, equal to plain decoding's within 1e-4, for sampled and prompt tokens;
- ``"fused": false`` falls back to vLLM's own step with the plugin's proposer.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from scipy import stats
from transformers import AutoTokenizer, Gemma4ForCausalLM

from vllm_mtp_gemma4.bench.job import Job, JobResult, run_job
from vllm_mtp_gemma4.worker.v1.host_reads import COUNT_ENV

from .conftest import ENGINE, TARGET, mtp_config
from .test_greedy_matrix import MATRIX_ENGINE, SMALL_CACHE, matrix_workload

pytestmark = pytest.mark.engine

SAMPLES = 3_000
UPSTREAM_SAMPLES = 2_000
STAT_SAMPLING = {"temperature": 0.8, "top_p": 0.9, "max_tokens": 3, "ignore_eos": True}
ALPHA = 1e-3  # per comparison; three comparisons per arm
# Cohen's w the test detects with power > 0.95 (computed per view from its degrees of freedom): between small (0.1)
# and medium (0.3); upstream's CPU error is far larger than 0.2.
EFFECT = 0.15
# Penalty, bias and min_p together. The bias is on 'a' (id 79), a token of STAT_PROMPT, so the repetition penalty
# applies to it: bias then penalty (vLLM's order) gives it p = 0.015 as the first token, penalty then bias 0.158
# (the target's fp32 logits through both orders, T=1, min_p 0.05): Cohen's w = 1.2 on the first token alone.
BIAS_SAMPLES = 1_500
BIAS_TOKEN = 79
BIAS_SAMPLING = {"temperature": 1.0, "repetition_penalty": 2.0, "logit_bias": {BIAS_TOKEN: 5.0}, "min_p": 0.05,
                 "max_tokens": 3, "ignore_eos": True}
BIAS_EFFECT = 0.15  # Cohen's w the penalty/bias test detects with power > 0.95 per view
BATCH_ENGINE = {**ENGINE, "max_num_seqs": 256}
PLUGIN_SPEC = {**mtp_config(3), "vllm_mtp_gemma4": {}}


def _prompts() -> tuple[list[int], list[list[int]]]:
    tok = AutoTokenizer.from_pretrained(TARGET)
    texts = json.loads((TARGET.parent / "held_out_prompts.json").read_text())
    ids = [tok(t).input_ids for t in texts]
    return ids[0][:30], [p[:40] for p in ids[1:7]]


STAT_PROMPT, SHORT = _prompts()
SEEDS = {0: 100, 2: 102, 4: 104, 5: 105}  # SHORT index -> seed; the others are unseeded


def _sampled(i: int, **extra) -> dict:
    return {"temperature": 0.8, "max_tokens": 24, "logprobs": 2, **({"seed": SEEDS[i]} if i in SEEDS else {}),
            **extra}


# Batch A: SHORT in order. Batch B: reversed, after four unseeded fillers, so every seeded request has other
# neighbours and another row index.
BATCH_A = [(i, _sampled(i)) for i in range(6)]
BATCH_B = [(i, _sampled(i, max_tokens=30)) for i in (1, 3, 1, 3)] + [(i, _sampled(i)) for i in reversed(range(6))]
GREEDY_LOGPROBS = {"temperature": 0.0, "max_tokens": 24, "logprobs": 3, "prompt_logprobs": 2}


def _rows(batch: list[tuple[int, dict]]) -> tuple[list[list[int]], list[dict]]:
    return [SHORT[i] for i, _ in batch], [s for _, s in batch]


@pytest.fixture(scope="module")
def plugin_run() -> JobResult:
    a_prompts, a_sampling = _rows(BATCH_A)
    b_prompts, b_sampling = _rows(BATCH_B)
    prompts = [STAT_PROMPT] * SAMPLES + a_prompts + b_prompts + SHORT + [STAT_PROMPT] * BIAS_SAMPLES
    sampling = ([STAT_SAMPLING] * SAMPLES + a_sampling + b_sampling + [GREEDY_LOGPROBS] * len(SHORT)
                + [BIAS_SAMPLING] * BIAS_SAMPLES)
    return run_job(Job(engine={**BATCH_ENGINE, "speculative_config": PLUGIN_SPEC}, prompts=prompts,
                       sampling=sampling, batches=[SAMPLES, len(a_prompts), len(b_prompts), len(SHORT), BIAS_SAMPLES],
                       worker_counters=True), timeout=1500)


def _batch_outputs(run: JobResult, start: int, batch: list) -> list[list[int]]:
    return run.token_ids[start:start + len(batch)]


@pytest.fixture(scope="module")
def plain_run(plugin_run) -> JobResult:
    """Plain decoding: the same 6,000 samples, the greedy logprobs, the plugin's sampled continuations scored as
    prompts (prompt_logprobs=0 gives the target's logprob of each of their tokens), and the penalty/bias samples."""
    a_out = _batch_outputs(plugin_run, SAMPLES, BATCH_A)
    scored = [SHORT[i] + out for (i, _), out in zip(BATCH_A, a_out)]
    prompts = [STAT_PROMPT] * SAMPLES + SHORT + scored + [STAT_PROMPT] * BIAS_SAMPLES
    sampling = ([STAT_SAMPLING] * SAMPLES + [GREEDY_LOGPROBS] * len(SHORT)
                + [{"max_tokens": 1, "prompt_logprobs": 0}] * len(scored) + [BIAS_SAMPLING] * BIAS_SAMPLES)
    return run_job(Job(engine=BATCH_ENGINE, prompts=prompts, sampling=sampling), timeout=1500)


@pytest.fixture(scope="module")
def upstream_run() -> JobResult:
    return run_job(Job(engine={**BATCH_ENGINE, "speculative_config": mtp_config(3)},
                       prompts=[STAT_PROMPT] * UPSTREAM_SAMPLES, sampling=STAT_SAMPLING, plugins=False),
                   timeout=1500)


def _samples(run: JobResult, count: int, start: int = 0) -> list[tuple[int, ...]]:
    samples = [tuple(t) for t in run.token_ids[start:start + count]]
    assert len(samples) == count and all(len(s) == 3 for s in samples)
    return samples


def chi_square(a: list, b: list, min_count: int = 40) -> tuple[float, int]:
    """Two-sample chi-square (p-value, degrees of freedom); categories rarer than ``min_count`` are pooled."""
    ca, cb = Counter(a), Counter(b)
    common = [c for c in ca.keys() | cb.keys() if ca[c] + cb[c] >= min_count]
    table = [[ca[c] for c in common] + [len(a) - sum(ca[c] for c in common)],
             [cb[c] for c in common] + [len(b) - sum(cb[c] for c in common)]]
    table = [[x for x, keep in zip(row, zip(*table)) if sum(keep) > 0] for row in table]
    result = stats.chi2_contingency(table)
    return float(result.pvalue), int(result.dof)


def power(n_total: int, dof: int, effect: float = EFFECT, alpha: float = ALPHA) -> float:
    """Probability that the test at ``alpha`` rejects when the two distributions differ by Cohen's w = effect."""
    critical = stats.chi2.ppf(1 - alpha, dof)
    return float(stats.ncx2.sf(critical, dof, n_total * effect**2))


def _views(samples: list[tuple[int, ...]], first: bool = False) -> dict[str, list]:
    views = {"token 1": [s[0] for s in samples]} if first else {}
    return {**views, "token 2": [s[1] for s in samples], "token 3": [s[2] for s in samples],
            "tokens 1-2": [s[:2] for s in samples]}


@pytest.fixture(scope="module")
def counted_run() -> JobResult:
    """Greedy and sampled rows (top-k, top-p, min-p, seeds), adaptive K, partial prefills: every host read counted."""
    spec = {**mtp_config(3), "vllm_mtp_gemma4": {"adaptive_k": True}}
    sampling = [{"temperature": 0.0, "max_tokens": 32}, {"temperature": 0.8, "top_p": 0.9, "max_tokens": 32},
                {"temperature": 1.0, "top_k": 20, "min_p": 0.05, "seed": 7, "max_tokens": 32}] * 4
    return run_job(Job(engine={**ENGINE, "max_num_batched_tokens": 64, "max_num_seqs": 16, "speculative_config": spec},
                       prompts=[*SHORT, *SHORT], sampling=sampling, env={COUNT_ENV: "1"}, worker_counters=True))


def test_one_host_read_per_fused_step(counted_run):
    (counters,) = counted_run.worker_counters
    assert counters["fused"] is True and counters["steps"] > 20
    assert counters["host_reads"] == {"to": counters["steps"]}  # the packed read, and nothing else
    # Adaptive K plans every step; its first plans measure each S = 3..0 in turn, so some steps draft nothing.
    assert counters["plans"] == counters["steps"] and counters["plain_steps"] > 0
    # The phases are timed inside the step: they never add up to more than the generate() calls took.
    assert 0 < sum(counters["phase_seconds"].values()) < sum(counted_run.seconds)
    assert all(seconds > 0 for seconds in counters["phase_seconds"].values())


def test_sampled_output_is_distributed_like_plain_sampling(plugin_run, plain_run):
    plugin, plain = _views(_samples(plugin_run, SAMPLES)), _views(_samples(plain_run, SAMPLES))
    for view in plugin:
        p, dof = chi_square(plugin[view], plain[view])
        assert power(2 * SAMPLES, dof) > 0.95, f"{view}: too few samples for w={EFFECT} at dof {dof}"
        print(f"{view}: chi-square p={p:.3g}, dof {dof}, power {power(2 * SAMPLES, dof):.3f} at w={EFFECT}")
        assert p > ALPHA, f"{view}: plugin samples differ from plain sampling (chi-square p={p:.2g}, dof {dof})"
    # Speculation does its job at T=0.8: a draft is accepted in a good share of steps.
    assert plugin_run.spec.mean_acceptance_length > 1.3


def test_penalty_bias_and_min_p_sample_like_plain_sampling(plugin_run, plain_run):
    """``repetition_penalty`` 2.0, ``logit_bias`` +5 on a token of the prompt and ``min_p`` 0.05 together, T=1: the
    first three tokens (the first from a prefill row, the others from drafted steps, where the penalty also sees the
    drafts before each position) are distributed as plain sampling's. Each view detects w = 0.1 with power > 0.95
    (alpha 1e-3, 3,000 samples a side); the bias applied after the penalty moves the first token alone by w = 1.2."""
    offset = SAMPLES + len(BATCH_A) + len(BATCH_B) + len(SHORT)
    plugin = _views(_samples(plugin_run, BIAS_SAMPLES, offset), first=True)
    plain_offset = SAMPLES + len(SHORT) + len(BATCH_A)
    plain = _views(_samples(plain_run, BIAS_SAMPLES, plain_offset), first=True)
    assert BIAS_TOKEN in STAT_PROMPT
    for view in plugin:
        p, dof = chi_square(plugin[view], plain[view])
        assert power(2 * BIAS_SAMPLES, dof, effect=BIAS_EFFECT) > 0.95, f"{view}: too few samples at dof {dof}"
        print(f"{view}: chi-square p={p:.3g}, dof {dof}, power {power(2 * BIAS_SAMPLES, dof, BIAS_EFFECT):.3f} "
              f"at w={BIAS_EFFECT}")
        assert p > ALPHA, f"{view}: plugin samples differ from plain sampling (chi-square p={p:.2g}, dof {dof})"
    # The biased token is drawn, so the order is exercised (0.015 expected as the first token).
    assert plain["token 1"].count(BIAS_TOKEN) > 10 and plugin["token 1"].count(BIAS_TOKEN) > 10


def test_the_bias_order_moves_the_first_token_far_beyond_what_the_test_resolves():
    """The penalty/bias test can fail: on the target's own fp32 logits (Hugging Face), the bias applied after the
    repetition penalty instead of before it moves the first token's distribution by w > 3 x BIAS_EFFECT."""
    model = Gemma4ForCausalLM.from_pretrained(TARGET, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        logits = model(torch.tensor([STAT_PROMPT])).logits[0, -1]
    seen = torch.tensor(sorted(set(STAT_PROMPT)))

    def penalized(x: torch.Tensor) -> torch.Tensor:  # vLLM's repetition penalty on tokens already seen
        x = x.clone()
        x[seen] = torch.where(x[seen] > 0, x[seen] / 2.0, x[seen] * 2.0)
        return x

    def biased(x: torch.Tensor) -> torch.Tensor:
        return x + 5.0 * torch.nn.functional.one_hot(torch.tensor(BIAS_TOKEN), x.shape[-1])

    def distribution(x: torch.Tensor) -> torch.Tensor:  # T=1, then min_p 0.05
        p = x.softmax(-1)
        p = p * (p >= 0.05 * p.max())
        return p / p.sum()

    vllm_order, other_order = distribution(penalized(biased(logits))), distribution(biased(penalized(logits)))
    support = (vllm_order + other_order) > 0
    w = (((vllm_order - other_order) ** 2)[support] / vllm_order[support].clamp(min=1e-12)).sum().sqrt().item()
    print(f"bias after the penalty: first token moved by w = {w:.2f}")
    assert w > 3 * BIAS_EFFECT


def test_the_same_test_rejects_upstream_cpu_sampling(upstream_run, plain_run):
    """Upstream vLLM 0.32's CPU speculative sampler (the bug the plugin fixes) fails this test."""
    upstream = _views(_samples(upstream_run, UPSTREAM_SAMPLES))
    plain = _views(_samples(plain_run, UPSTREAM_SAMPLES))
    p, dof = chi_square(upstream["token 2"], plain["token 2"])
    assert power(2 * UPSTREAM_SAMPLES, dof, effect=0.2) > 0.99  # upstream's error is far larger than w=0.2
    print(f"upstream token 2: chi-square p={p:.3g}, dof {dof}")
    assert p < ALPHA, f"upstream passed (p={p:.2g}): the test could not tell its bug apart"
    assert upstream_run.spec.mean_acceptance_length < 1.3  # near 1: its draws almost never match a draft


def test_seeded_requests_ignore_their_batch(plugin_run):
    a = dict(zip(range(6), _batch_outputs(plugin_run, SAMPLES, BATCH_A)))
    b_out = _batch_outputs(plugin_run, SAMPLES + len(BATCH_A), BATCH_B)
    b = {i: out for (i, _), out in zip(BATCH_B[4:], b_out[4:])}
    for i, seed in SEEDS.items():
        assert a[i] == b[i], f"seed {seed}: tokens changed with the batch around the request"
    assert any(a[i] != b[i] for i in range(6) if i not in SEEDS), "unseeded requests should differ"


def test_logprobs_are_the_targets(plugin_run, plain_run):
    offset = SAMPLES + len(BATCH_A) + len(BATCH_B)
    for i in range(len(SHORT)):
        ours, theirs = plugin_run, plain_run
        r_ours, r_theirs = offset + i, SAMPLES + i
        assert ours.token_ids[r_ours] == theirs.token_ids[r_theirs]
        for kind in ("logprobs", "prompt_logprobs"):
            for step_ours, step_theirs in zip(getattr(ours, kind)[r_ours], getattr(theirs, kind)[r_theirs]):
                if step_theirs is None:
                    assert step_ours is None
                    continue
                assert step_ours.keys() == step_theirs.keys()
                for token, value in step_theirs.items():
                    assert abs(step_ours[token] - value) < 1e-4
    # Sampled tokens: the plugin's logprob of each sampled token is the target's, scored by plain decoding.
    a_out = _batch_outputs(plugin_run, SAMPLES, BATCH_A)
    for row, ((i, _), out) in enumerate(zip(BATCH_A, a_out)):
        scored = plain_run.prompt_logprobs[SAMPLES + len(SHORT) + row][len(SHORT[i]):]
        sampled = plugin_run.logprobs[SAMPLES + row]
        for token, ours, target in zip(out, sampled, scored):
            assert abs(ours[token] - target[token]) < 1e-4


@pytest.fixture(scope="module")
def seeded_matrix() -> tuple[list[list[int]], list[dict]]:
    prompts, sampling = matrix_workload()
    return prompts, [{**s, "temperature": 0.8, "seed": 1000 + i} for i, s in enumerate(sampling)]


def test_seeded_requests_survive_preemption_and_chunked_prefill(seeded_matrix):
    """32 seeded requests of 1 to 1500 tokens: chunked prefill (256-token budget) and a cache that preempts give
    the same tokens as one roomy batch in reverse order."""
    prompts, sampling = seeded_matrix
    engine = {**MATRIX_ENGINE, "speculative_config": PLUGIN_SPEC}
    squeezed = run_job(Job(engine={**engine, **SMALL_CACHE}, prompts=prompts, sampling=sampling))
    assert squeezed.metrics.get("vllm:num_preemptions", 0) > 0, "the small cache did not preempt"
    roomy = run_job(Job(engine=engine, prompts=prompts[::-1], sampling=sampling[::-1]))
    assert squeezed.token_ids == roomy.token_ids[::-1]


def test_upstream_dies_on_the_same_seeded_workload(seeded_matrix):
    """The upstream crash this replaces: a seeded request in chunked prefill rewinds a CPU generator."""
    prompts, sampling = seeded_matrix
    engine = {**MATRIX_ENGINE, **SMALL_CACHE, "speculative_config": mtp_config(3)}
    with pytest.raises(RuntimeError, match="does not use offset"):
        run_job(Job(engine=engine, prompts=prompts, sampling=sampling, plugins=False))


def test_unfused_config_defers_to_vllms_step(plain_greedy, held_out_prompts):
    spec = {**mtp_config(3), "vllm_mtp_gemma4": {"fused": False}}
    result = run_job(Job(engine={**ENGINE, "speculative_config": spec}, prompts=held_out_prompts[:8],
                         sampling={"temperature": 0.0, "max_tokens": 64}, worker_counters=True))
    (counters,) = result.worker_counters
    assert counters["fused"] is False and counters["steps"] == 0
    assert result.token_ids == plain_greedy.token_ids[:8]
    assert result.spec.mean_acceptance_length > 2.0


def test_unfused_plugin_engine_survives_seeded_chunked_prefill(seeded_matrix):
    """With ``fused: false`` the plugin's engine keeps vLLM's step but rewinds CPU generators by saving their state,
    so the workload that kills upstream completes."""
    prompts, sampling = seeded_matrix
    spec = {**mtp_config(3), "vllm_mtp_gemma4": {"fused": False}}
    result = run_job(Job(engine={**MATRIX_ENGINE, **SMALL_CACHE, "speculative_config": spec}, prompts=prompts,
                         sampling=sampling))
    assert len(result.token_ids) == len(prompts) and all(r in ("length", "stop") for r in result.finish_reasons)
    assert result.metrics.get("vllm:num_preemptions", 0) > 0


def test_an_engine_without_the_plugins_config_runs_vllms_own_runner(held_out_prompts, plain_greedy):
    result = run_job(Job(engine=ENGINE, prompts=held_out_prompts[:2], sampling={"temperature": 0.0, "max_tokens": 8},
                         worker_counters=True))
    assert [c["runner"] for c in result.worker_counters] == ["CPUModelRunner"]
    assert result.token_ids == [t[:8] for t in plain_greedy.token_ids[:2]]
