"""Unit tests of the pure tensor ops of the speculative step (no vLLM, no engine)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch import Tensor

from vllm_mtp_gemma4.ops import (
    Calibration,
    DraftPlan,
    Planner,
    RelaxedInputs,
    SamplingTensors,
    StepTimes,
    Verdict,
    Verification,
    accepted_rows,
    advance_thinking,
    batch_bucket,
    choose_num_drafts,
    draft_chances,
    draft_survival,
    exploring,
    force_relaxed_drafts,
    force_tokens,
    greedy_verdict,
    head_indices,
    moving_average_in_order,
    next_tokens,
    plan_drafts,
    process_logits,
    reduce_top1,
    relaxed_accepts,
    relaxed_verdict,
    resolve,
    sample_from_probs,
    sampled_verdict,
    shard_top1,
    strict_only,
    thinking_after,
    thinking_at_lengths,
    thinking_flags,
    thinking_flags_ragged,
    uniform_noise,
    verify_greedy,
    verify_step,
)
from vllm_mtp_gemma4.ops.adaptive import CALIBRATION_RANGE
from vllm_mtp_gemma4.ops.cost import OWN_SAMPLES

OPEN, CLOSE = 6, 7  # thinking markers in the small test vocabularies


def t(values, dtype=None) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def logits_with_argmax(top: torch.Tensor, vocab: int) -> torch.Tensor:
    """[B, P, V] logits whose argmax at each position is top[B, P], with distinct non-tied values elsewhere."""
    base = torch.linspace(0.0, 1.0, vocab).expand(*top.shape, vocab)
    return base + 5.0 * F.one_hot(top, vocab)


def sampling(batch: int, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=None) -> SamplingTensors:
    def full(value, dtype):
        return value if isinstance(value, torch.Tensor) else torch.full((batch,), value, dtype=dtype)

    seed = torch.arange(batch) if seed is None else seed
    return SamplingTensors(full(temperature, torch.float32), full(top_k, torch.long), full(top_p, torch.float32),
                           full(min_p, torch.float32), full(seed, torch.long))


# ---------------------------------------------------------------- layout


def test_head_indices_gather_each_rows_verified_positions_left_aligned():
    # vLLM's layout: rows of 3, 1 and 2 logits (drafts then bonus); K + 1 = 3 slots each.
    offsets = t([0, 3, 4, 6])
    assert head_indices(offsets, 3).tolist() == [[0, 1, 2], [3, 3, 3], [4, 5, 5]]


# ---------------------------------------------------------------- counter-based noise


def _reference_noise(seed: int, counter: int, stream: int) -> float:
    """The documented hash in plain Python integers: lowbias32 and murmur3 fmix32 lanes over 32-bit words."""
    mask = 0xFFFFFFFF

    def mix(x: int, c1: int, c2: int, shift: int) -> int:
        x ^= x >> 16
        x = (x * c1) & mask
        x ^= x >> shift
        x = (x * c2) & mask
        return x ^ (x >> 16)

    a = b = 0
    for word in (seed & mask, (seed >> 32) & mask, counter & mask, (counter >> 32) & mask, stream):
        a = mix(((a ^ word) + 0x9E3779B9) & mask, 0x7FEB352D, 0x846CA68B, 15)
        b = mix(((b ^ word) + a) & mask, 0x85EBCA6B, 0xC2B2AE35, 13)
    return (((a << 21) | (b >> 11)) + 1) / 2**53


def test_noise_matches_the_reference_hash_without_int64_overflow():
    seeds = [0, 1, -1, 2**62 + 3, -(2**63)]
    counters = [0, 1, 2**31, 2**40 + 5]
    got = uniform_noise(t(seeds), t(counters).expand(len(seeds), -1), stream=3)
    want = [[_reference_noise(s, c, 3) for c in counters] for s in seeds]
    assert got.dtype == torch.float64
    assert got.tolist() == want
    # The fused step computes it on the host with numpy: the same bits.
    on_host = uniform_noise(np.array(seeds), np.array([counters] * len(seeds)), stream=3)
    assert on_host.dtype == np.float64
    assert on_host.tolist() == want


def test_a_token_far_below_float32_resolution_owns_exactly_its_interval():
    """p = 1e-12 between two halves: its CDF interval is 1e-12 wide, far below float32's step at 0.5 (6e-8), so a
    float32 CDF (or float32 uniforms) could never draw it, or would draw it 1e5 times too often. In float64 the
    uniforms inside its interval, and only those, draw it; and the noise carries 53 bits to land there."""
    probs = t([0.5, 1e-12, 0.5 - 1e-12], torch.float64)
    inside = t([0.5 + 1e-13, 0.5 + 9e-13], torch.float64)
    outside = t([0.5 - 1e-13, 0.5 + 1.1e-12], torch.float64)
    assert sample_from_probs(probs, inside).tolist() == [1, 1]
    assert sample_from_probs(probs, outside).tolist() == [0, 2]
    noise = uniform_noise(t([3]), torch.arange(10_000)[None])[0]
    steps = noise * 2**53
    assert torch.equal(steps, steps.round()) and (steps >= 1).all() and (noise <= 1).all()
    assert ((noise * 2**32) % 1 > 0).float().mean() > 0.99  # bits beyond float32's 24 vary


def test_draws_in_the_tail_of_a_262k_vocabulary_keep_its_share():
    """Gemma 4's vocabulary: 250,000 tokens of p = 8e-8 each (2% of the mass) after 144 likely ones. Over 400,000
    counter-based draws the tail's share is 2% within 5 standard errors (0.0011)."""
    vocab, tail, p_tail = 262_144, 250_000, 8e-8
    probs = torch.zeros(vocab, dtype=torch.float32)
    probs[vocab - tail:] = p_tail
    probs[:vocab - tail] = (1 - tail * p_tail) / (vocab - tail)
    draws = 400_000
    uniforms = uniform_noise(t([7]), torch.arange(draws)[None])[0]
    tokens = sample_from_probs(probs, uniforms)  # one distribution, every uniform
    share = (tokens >= vocab - tail).double().mean().item()
    standard_error = (tail * p_tail * (1 - tail * p_tail) / draws) ** 0.5
    assert abs(share - tail * p_tail) < 5 * standard_error, share


def test_noise_changes_with_seed_high_word_counter_and_stream():
    base = uniform_noise(t([1]), t([[5]]))
    for other in (uniform_noise(t([1 + 2**32]), t([[5]])), uniform_noise(t([1]), t([[5 + 2**32]])),
                  uniform_noise(t([1]), t([[6]])), uniform_noise(t([1]), t([[5]]), stream=1)):
        assert not torch.equal(other, base)
    # Streams are not relabelled seeds: with a single xor-fed lane, stream 1 of seed x would be stream 0 of x ^ 1.
    seeds = torch.arange(1024)
    by_stream = [uniform_noise(seeds, t([[7]]), stream=s).flatten().sort().values for s in (0, 1)]
    assert not torch.equal(*by_stream)


def test_noise_is_uniform_in_the_open_interval():
    by_counter = uniform_noise(t([42]), torch.arange(100_000)[None]).flatten()
    by_seed = uniform_noise(torch.arange(100_000), t([[17]])).flatten()
    for u in (by_counter, by_seed):
        assert 0.0 < u.min() and u.max() < 1.0
        assert stats.kstest(u.double().numpy(), "uniform").pvalue > 1e-3


# ---------------------------------------------------------------- processing and drawing


def probs_logits(*probs: float) -> torch.Tensor:
    return torch.log(t(probs))


def process(logits: torch.Tensor, **kwargs) -> torch.Tensor:
    s = sampling(logits.shape[0], **kwargs)
    return process_logits(logits, s.temperature, s.top_k, s.top_p, s.min_p)


def assert_probs(got: torch.Tensor, want) -> None:
    torch.testing.assert_close(got, torch.as_tensor(want, dtype=torch.float32), atol=1e-6, rtol=1e-5)


def test_temperature_scales_logits():
    logits = t([[1.0, 2.0, 3.0, 0.0]])
    assert_probs(process(logits, temperature=2.0), torch.softmax(logits / 2, -1))


def test_greedy_rows_are_one_hot_on_the_first_argmax():
    logits = t([[1.0, 3.0, 3.0, 0.0], [0.0, 0.0, 0.0, 5.0]])
    assert_probs(process(logits, temperature=t([0.0, 1e-6]), top_k=1, top_p=0.1), [[0, 1, 0, 0], [0, 0, 0, 1]])


def test_top_k_keeps_the_k_most_likely_and_ties_at_the_kth_place():
    assert_probs(process(probs_logits(0.1, 0.4, 0.2, 0.3)[None], top_k=2), [[0, 4 / 7, 0, 3 / 7]])
    tied = process(t([[2.0, 1.0, 1.0, 0.0]]), top_k=2)
    assert (tied[0] > 0).tolist() == [True, True, True, False]
    assert_probs(process(probs_logits(0.1, 0.4, 0.2, 0.3)[None], top_k=-1), [[0.1, 0.4, 0.2, 0.3]])


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    logits = probs_logits(0.5, 0.3, 0.15, 0.05)[None]
    assert_probs(process(logits, top_p=0.7), [[0.625, 0.375, 0, 0]])
    assert_probs(process(logits, top_p=0.85), [[0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0]])
    assert_probs(process(logits, top_p=0.45), [[1, 0, 0, 0]])
    assert process(t([[0.0, -30.0]]), top_p=1.0)[0, 1] > 0  # top_p = 1 drops nothing, however small


def test_top_p_applies_to_the_top_k_renormalized_mass():
    # After top-2 the mass is [4/7, 3/7]: 4/7 > 0.55 already, so only the first token is left.
    assert_probs(process(probs_logits(0.4, 0.3, 0.2, 0.1)[None], top_k=2, top_p=0.55), [[1, 0, 0, 0]])
    assert_probs(process(probs_logits(0.4, 0.3, 0.2, 0.1)[None], top_k=2, top_p=0.6), [[4 / 7, 3 / 7, 0, 0]])


def test_min_p_is_relative_to_the_top_probability_and_comes_before_top_p():
    logits = probs_logits(0.5, 0.3, 0.15, 0.05)[None]
    assert_probs(process(logits, min_p=0.5), [[0.625, 0.375, 0, 0]])
    # min_p 0.2 drops 0.05; renormalized, the first two hold 0.8/0.95 > 0.83, so top-p then drops 0.15.
    assert_probs(process(logits, min_p=0.2, top_p=0.83), [[0.625, 0.375, 0, 0]])


def test_processing_uses_each_rows_own_parameters_at_every_position():
    row = probs_logits(0.5, 0.3, 0.15, 0.05)
    logits = row.expand(3, 2, 4)
    got = process(logits, top_k=t([1, 0, 0]), top_p=t([1.0, 0.7, 1.0]), temperature=t([1.0, 1.0, 0.0]))
    want = [[1, 0, 0, 0], [0.625, 0.375, 0, 0], [1, 0, 0, 0]]
    assert_probs(got, [[w, w] for w in want])


def test_inverse_cdf_draw_never_picks_a_zero_probability_token():
    probs = t([[1.0, 0.0, 3.0]]).expand(6, 3)  # unnormalized on purpose
    u = t([2.0**-24, 0.25, 0.2500001, 0.9, 1 - 2.0**-24, 1.0])
    assert sample_from_probs(probs, u).tolist() == [0, 0, 2, 2, 2, 2]


# ---------------------------------------------------------------- greedy verification


def test_verify_greedy_accept_reject_short_rows_and_bonus():
    top = t([[1, 2, 3, 4],   # accept all: bonus 4
             [5, 2, 3, 4],   # reject first: emit 5
             [1, 6, 3, 4],   # reject in the middle: emit 6
             [1, 7, 3, 4],   # one draft, accepted: the argmax after it (7), though slot 2 would match too
             [2, 2, 3, 4],   # prefill row: no drafts, acceptance forced to 0
             [1, 2, 3, 4]])  # two drafts, both accepted: the argmax after them
    drafts = t([[1, 2, 3], [1, 2, 3], [1, 2, 3], [1, 7, 3], [2, 2, 3], [1, 2, 3]])
    result = verify_greedy(logits_with_argmax(top, 8), drafts, num_drafts=t([3, 3, 3, 1, 0, 2]))
    assert result.num_accepted.tolist() == [3, 0, 1, 1, 0, 2]
    assert result.recovered.tolist() == top[:, :3].tolist()
    assert result.bonus.tolist() == [4, 4, 4, 4, 4, 4]
    assert next_tokens(result).tolist() == [4, 5, 6, 7, 2, 3]


def test_next_tokens_indexes_recovered_then_bonus():
    v = Verification(t([0, 2, 1]), t([[10, 11], [20, 21], [30, 31]]), t([12, 22, 32]))
    assert next_tokens(v).tolist() == [10, 22, 31]


def test_zero_drafts_everywhere():
    result = verify_greedy(logits_with_argmax(t([[3], [1]]), 5), torch.zeros(2, 0, dtype=torch.long), t([0, 0]))
    assert result.num_accepted.tolist() == [0, 0]
    assert next_tokens(result).tolist() == [3, 1]


def test_greedy_rows_of_the_fused_step_match_greedy_verification():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 4, 10, generator=gen)
    # Drafts agree with the argmax most of the time, so every acceptance length shows up.
    drafts = torch.where(torch.rand(64, 3, generator=gen) < 0.7, logits[:, :3].argmax(-1),
                         torch.randint(0, 10, (64, 3), generator=gen))
    num_drafts = torch.randint(0, 4, (64,), generator=gen)
    relaxed = RelaxedInputs(torch.ones(64, 3, dtype=torch.bool), torch.zeros(64, dtype=torch.bool), t([10] * 64),
                            t([1.0] * 64), NO_IDS)
    step = verify_step(logits, drafts, num_drafts, sampling(64, temperature=0.0, top_k=3, top_p=0.5),
                       torch.arange(4).expand(64, 4), relaxed)
    greedy = verify_greedy(logits, drafts, num_drafts)
    assert torch.equal(step.num_accepted, greedy.num_accepted)
    assert torch.equal(next_tokens(step), next_tokens(greedy))
    assert len(set(greedy.num_accepted.tolist())) == 4


# ---------------------------------------------------------------- sampled verification is lossless

ROWS = 30_000
VOCAB = 6
# Each position's target logits; the prefix does not change them here, which a real target may do freely.
TARGET_LOGITS = t([[2.0, 1.5, 1.0, 0.5, 0.0, -3.0], [0.0, 1.0, 0.2, 1.2, -0.5, 0.7], [0.3, 0.0, 0.0, 0.0, 0.0, 0.0]])
# Power: chi-square, df <= 5, alpha = 1e-3, N = 30,000 rows detects an effect size w = 0.035 (for instance one
# point of probability moved between two tokens of probability about 0.15) with probability > 0.97
# (noncentral chi-square, lambda = N w^2 = 37). Fewer rows reach the second position, so its power is lower.
ALPHA = 1e-3


def chi_square_pvalue(tokens: torch.Tensor, p: torch.Tensor) -> float:
    counts = torch.bincount(tokens, minlength=VOCAB).double()
    support = p > 0
    if counts[~support].sum() > 0:
        return 0.0  # a token p~ rules out: certainly not drawn from p~
    expected = p[support].double() / p[support].double().sum() * len(tokens)
    return stats.chisquare(counts[support].numpy(), expected.numpy()).pvalue


def emitted(drafts: torch.Tensor, result: Verification, position: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token emitted at `position`, over the rows that got there (all earlier drafts accepted)."""
    reached = result.num_accepted >= position
    token = torch.where(result.num_accepted > position, drafts[:, position], next_tokens(result))
    return token[reached], reached


@pytest.fixture(scope="module")
def lossless_setup():
    gen = torch.Generator().manual_seed(1234)
    s = sampling(ROWS, temperature=0.9, top_k=5, top_p=0.97, min_p=0.02, seed=torch.arange(ROWS) + 10_000)
    logits = TARGET_LOGITS.expand(ROWS, 3, VOCAB)
    target = process_logits(logits, s.temperature, s.top_k, s.top_p, s.min_p)
    # Argmax-like drafts: the mode 60% of the time, else any token, including ones p~ rules out.
    drafts = torch.where(torch.rand(ROWS, 2, generator=gen) < 0.6, target[:, :2].argmax(-1),
                         torch.randint(0, VOCAB, (ROWS, 2), generator=gen))
    positions = torch.arange(100, 103).expand(ROWS, 3)
    return s, target, drafts, positions


def assert_lossless(drafts: torch.Tensor, result: Verification, target: torch.Tensor) -> None:
    for position in (0, 1):
        token, _ = emitted(drafts, result, position)
        assert len(token) > 5_000
        assert chi_square_pvalue(token, target[0, position]) > ALPHA


def test_point_mass_verification_is_lossless(lossless_setup):
    s, target, drafts, positions = lossless_setup
    assert (target[0, :2] == 0).any(), "the setup should truncate some tokens"
    result = resolve(sampled_verdict(sample_from_probs(target, uniform_noise(s.seed, positions)), drafts),
                     torch.full((ROWS,), 2))
    assert_lossless(drafts, result, target)


def test_the_lossless_test_catches_always_accept_and_unconditioned_resampling(lossless_setup):
    s, target, drafts, positions = lossless_setup
    always = Verification(torch.full((ROWS,), 2), drafts, drafts[:, 0])
    assert chi_square_pvalue(emitted(drafts, always, 0)[0], target[0, 0]) < 1e-12
    # Subtler bug: on rejection, emit a fresh draw from p~ instead of the draw that was compared.
    verdict = sampled_verdict(sample_from_probs(target, uniform_noise(s.seed, positions)), drafts)
    fresh = sample_from_probs(target, uniform_noise(s.seed, positions, stream=1))
    result = resolve(verdict._replace(emit=fresh), torch.full((ROWS,), 2))
    assert chi_square_pvalue(emitted(drafts, result, 0)[0], target[0, 0]) < 1e-12


def test_fused_step_rows_do_not_depend_on_the_batch():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(5, 4, 12, generator=gen)
    drafts = torch.randint(0, 12, (5, 3), generator=gen)
    s = sampling(5, temperature=t([0.7, 1.0, 0.0, 1.3, 0.9]), top_k=t([0, 5, 0, 3, 8]),
                 top_p=t([0.9, 1.0, 1.0, 0.8, 0.95]), seed=t([11, 22, 33, 44, 55]))
    args = (t([3, 2, 3, 1, 3]), s, torch.arange(50, 54).expand(5, 4) + 10 * torch.arange(5)[:, None],
            RelaxedInputs(torch.rand(5, 3, generator=gen) < 0.5, t([True, True, False, True, False]),
                          t([3, 2, 1, 4, 2]), t([0.3, 0.1, 0.5, 0.2, 0.4]), NO_IDS))

    def step(rows):
        picked = [x[rows] if isinstance(x, torch.Tensor)
                  else x._replace(**{k: v[rows] for k, v in x._asdict().items() if k != "strict_ids" and v is not None})
                  for x in args]
        result = verify_step(logits[rows], drafts[rows], *picked)
        return result.num_accepted, next_tokens(result)

    full = step(torch.arange(5))
    part = step(t([4, 1, 3]))
    for got, want in zip(part, full):
        assert torch.equal(got, want[t([4, 1, 3])])


def test_draws_in_row_chunks_are_the_whole_batch_draws_bit_for_bit(monkeypatch):
    """``draw_tokens`` in chunks of 3 rows at V=1000, over an index of rows with repeats, gives the tokens of one
    ``process_logits`` + ``sample_from_probs`` call over all of them: greedy and sampled rows, temperature, top-k,
    top-p, min-p and the partial top-k. Also against the whole-vocabulary draw of the code before chunking (an
    int64 one-hot for greedy rows, a float64 copy and then its CDF)."""
    from vllm_mtp_gemma4.ops import draw_tokens
    from vllm_mtp_gemma4.ops import sampling as sampling_ops

    monkeypatch.setattr(sampling_ops, "DRAW_CHUNK_BYTES", 3 * 4 * 1000)
    assert sampling_ops.draw_chunk(1000) == 3
    gen = torch.Generator().manual_seed(8)
    logits = torch.randn(9, 1000, generator=gen) * 3
    rows = t([4, 0, 0, 8, 1, 2, 3, 5, 6, 7, 8, 2, 4, 1])  # 14 draws: 5 chunks, the last one short
    n = len(rows)
    temperature = torch.where(torch.arange(n) % 4 == 0, 0.0, 0.5 + torch.rand(n, generator=gen))
    top_k = torch.randint(0, 60, (n,), generator=gen)
    top_p = torch.where(torch.arange(n) % 3 == 0, 1.0, 0.5 + 0.5 * torch.rand(n, generator=gen))
    min_p = torch.where(torch.arange(n) % 5 == 0, 0.1, 0.0)
    uniforms = uniform_noise(torch.arange(n) + 3, torch.arange(n)[:, None] * 7)[:, 0]
    for args, max_top_k in (((top_k, top_p, min_p), None), ((top_k.clamp(min=1), None, None), 60),
                            ((None, top_p, None), None), ((None, None, None), None)):
        got = draw_tokens(logits, rows, temperature, *args, uniforms, max_top_k)
        whole = process_logits(logits[rows], temperature, *args, max_top_k)
        assert torch.equal(got, sample_from_probs(whole, uniforms))
        one_hot = F.one_hot(logits[rows].argmax(-1), 1000).float()
        before = torch.where(temperature[:, None] < 1e-5, one_hot, whole)
        cdf = before.double().cumsum(-1)
        assert torch.equal(got, torch.searchsorted(cdf, uniforms[:, None] * cdf[:, -1:]).squeeze(-1))
    assert torch.equal(got[temperature == 0], logits[rows].argmax(-1)[temperature == 0])
    assert len(set(got.tolist())) > 5


def test_fused_step_on_vllms_flat_logits_equals_the_gathered_slots():
    """``rows`` (vLLM's flat layout, ragged rows) gives what the same logits gathered into [B, K+1, V] give:
    greedy, sampled and relaxed rows."""
    gen = torch.Generator().manual_seed(6)
    num_drafts = t([3, 0, 2, 3, 1])
    offsets = F.pad((num_drafts + 1).cumsum(0), (1, 0))
    flat = torch.randn(int(offsets[-1]), 40, generator=gen) * 2
    heads = head_indices(offsets, 4)
    drafts = torch.where(torch.rand(5, 3, generator=gen) < 0.6, flat[heads][:, :3].argmax(-1),
                         torch.randint(0, 40, (5, 3), generator=gen))
    s = sampling(5, temperature=t([0.8, 1.0, 0.0, 1.2, 0.0]), top_k=t([0, 5, 0, 10, 0]), top_p=t([0.9] * 5))
    relaxed = RelaxedInputs(torch.rand(5, 3, generator=gen) < 0.7, t([True, False, True, True, False]),
                            t([3] * 5), t([0.4] * 5), NO_IDS)
    positions = torch.arange(4).expand(5, 4) + 100
    for extra in ((), (relaxed,)):
        got = verify_step(flat, drafts, num_drafts, s, positions, *extra, rows=heads)
        want = verify_step(flat[heads], drafts, num_drafts, s, positions, *extra)
        assert torch.equal(got.num_accepted, want.num_accepted) and torch.equal(next_tokens(got), next_tokens(want))
    got = verify_greedy(flat, drafts, num_drafts, rows=heads)
    want = verify_greedy(flat[heads], drafts, num_drafts)
    assert torch.equal(got.num_accepted, want.num_accepted) and torch.equal(next_tokens(got), next_tokens(want))


# ---------------------------------------------------------------- relaxed acceptance

NO_IDS = torch.tensor([], dtype=torch.long)


def verify_relaxed(logits, drafts, num_drafts, flags, topk, delta, strict, strict_ids=NO_IDS):
    return resolve(relaxed_verdict(logits, drafts, num_drafts, flags, topk, delta, strict, strict_ids), num_drafts)


def relaxed(probs: list[float], draft: int, topk: int, delta: float) -> tuple[int, int]:
    """One flagged draft judged against raw-logit probabilities: (num_accepted, next token)."""
    logits = torch.log(t([probs, probs]))[None]
    drafts = t([[draft]])
    result = verify_relaxed(logits, drafts, t([1]), t([[True]]), t([topk]), t([delta]), greedy_verdict(logits, drafts))
    return result.num_accepted.item(), next_tokens(result).item()


P5 = [0.40, 0.30, 0.15, 0.10, 0.05]


def test_relaxed_accepts_near_top_drafts_within_topk():
    assert relaxed(P5, 1, topk=2, delta=0.15) == (1, 0)  # 0.30 >= 0.40 - 0.15: accepted, bonus is top-1
    assert relaxed(P5, 1, topk=2, delta=0.05) == (0, 0)  # too far below the top: the top-1 is emitted
    assert relaxed(P5, 2, topk=2, delta=1.0) == (0, 0)  # close enough, but third


def test_relaxed_with_zero_delta_is_top_1():
    assert [relaxed(P5, d, topk=5, delta=0.0)[0] for d in range(5)] == [1, 0, 0, 0, 0]
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(64, 4, 10, generator=gen)
    drafts = torch.where(torch.rand(64, 3, generator=gen) < 0.7, logits[:, :3].argmax(-1),
                         torch.randint(0, 10, (64, 3), generator=gen))
    num_drafts = torch.randint(0, 4, (64,), generator=gen)
    strict = greedy_verdict(logits, drafts)
    got = verify_relaxed(logits, drafts, num_drafts, torch.ones(64, 3, dtype=torch.bool), t([10] * 64),
                         t([0.0] * 64), strict)
    want = verify_greedy(logits, drafts, num_drafts)
    assert torch.equal(got.num_accepted, want.num_accepted)
    assert torch.equal(next_tokens(got), next_tokens(want))


def test_relaxed_with_delta_above_top_1_is_topk_membership():
    assert [relaxed(P5, d, topk=3, delta=0.4)[0] for d in range(5)] == [1, 1, 1, 0, 0]
    assert [relaxed(P5, d, topk=3, delta=1.0)[0] for d in range(5)] == [1, 1, 1, 0, 0]


def test_relaxed_with_n_1_is_top_1_whatever_delta():
    assert [relaxed(P5, d, topk=1, delta=1.0)[0] for d in range(5)] == [1, 0, 0, 0, 0]


def test_relaxed_ties_share_the_better_place():
    tied = [0.3, 0.3, 0.2, 0.2]
    assert [relaxed(tied, d, topk=3, delta=1.0)[0] for d in range(4)] == [1, 1, 1, 1]  # tie at the 3rd place is in
    assert [relaxed(tied, d, topk=2, delta=1.0)[0] for d in range(4)] == [1, 1, 0, 0]
    assert [relaxed(tied, d, topk=1, delta=0.0)[0] for d in range(4)] == [1, 1, 0, 0]  # either tied top-1 passes
    assert relaxed(tied, 3, topk=1, delta=0.0) == (0, 0)  # rejection emits the first of the tied top-1


def test_unflagged_positions_keep_the_strict_result():
    logits = torch.log(t([P5] * 3))[None]
    drafts = t([[1, 1]])
    strict = greedy_verdict(logits, drafts)

    def accepted(flags: list[bool]) -> int:
        return verify_relaxed(logits, drafts, t([2]), t([flags]), t([5]), t([1.0]), strict).num_accepted.item()

    assert [accepted([False, False]), accepted([True, False]), accepted([True, True])] == [0, 1, 2]


def test_relaxed_bonus_after_a_short_row_is_the_strict_draw():
    logits = torch.log(t([P5] * 3))[None]
    drafts = t([[1, 2]])
    # As if sampled: the strict rule emits 2 at position 1, where the top-1 is 0.
    strict = greedy_verdict(logits, drafts)._replace(emit=t([[0, 2, 4]]))
    result = verify_relaxed(logits, drafts, t([1]), t([[True, True]]), t([5]), t([1.0]), strict)
    assert result.num_accepted.tolist() == [1]
    assert next_tokens(result).tolist() == [2]  # slot 2 is past the row's drafts: no relaxed judgement there


def test_relaxed_keeps_what_the_strict_rule_accepts():
    """Strict OR relaxed: a sampled draw that matched a draft outside the top-N still accepts it."""
    logits = torch.log(t([P5] * 2))[None]
    drafts = t([[4]])
    strict = Verdict(t([[True]]), t([[4, 0]]))
    assert verify_relaxed(logits, drafts, t([1]), t([[True]]), t([2]), t([0.05]), strict).num_accepted.tolist() == [1]


def test_relaxed_rejection_emits_the_strict_draw_of_a_sampled_row():
    logits = torch.log(t([P5] * 2))[None]
    drafts = t([[3]])  # fourth: relaxed with N=2 rejects it
    strict = Verdict(t([[False]]), t([[2, 0]]))  # as if the row drew 2
    result = verify_relaxed(logits, drafts, t([1]), t([[True]]), t([2]), t([1.0]), strict)
    assert (result.num_accepted.item(), next_tokens(result).item()) == (0, 2)


def test_markers_and_eos_pass_only_strictly():
    logits = torch.log(t([[0.4, 0.0, 0.0, 0.0, 0.0, 0.0, 0.3, 0.3]] * 2).clamp(min=1e-9))[None]
    strict = greedy_verdict(logits, t([[CLOSE]]))
    for draft, strict_ids, want in ((CLOSE, [CLOSE], 0), (CLOSE, [], 1), (OPEN, [CLOSE], 1)):
        drafts = t([[draft]])
        got = verify_relaxed(logits, drafts, t([1]), t([[True]]), t([3]), t([0.2]), greedy_verdict(logits, drafts),
                             torch.tensor(strict_ids, dtype=torch.long))
        assert got.num_accepted.item() == want, (draft, strict_ids)
    assert strict.accept.tolist() == [[False]]


def test_relaxed_never_accepts_a_masked_token():
    logits = torch.log(t([[0.5, 0.5, 0.0]] * 2))[None]  # token 2 masked (-inf), e.g. by a grammar
    drafts = t([[2]])
    got = verify_relaxed(logits, drafts, t([1]), t([[True]]), t([3]), t([1.0]), greedy_verdict(logits, drafts))
    assert got.num_accepted.item() == 0


def test_force_tokens_makes_the_token_certain_and_leaves_other_rows():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 50, generator=gen) * 5
    before = logits.clone()
    force_tokens(logits, torch.arange(4), t([7, 8, 9, 10]), t([True, False, True, True]))
    assert logits.argmax(-1).tolist()[::2] == [7, 9] and logits[3].argmax().item() == 10
    assert torch.equal(logits[1], before[1])
    for temperature in (0.5, 1.0, 4.0):
        assert (logits[[0, 2, 3]] / temperature).softmax(-1).amax(-1).min().item() == 1.0


def test_thinking_state_of_a_prefix_and_of_ragged_rows_match_the_host_walk():
    gen = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 9, (40, 12), generator=gen)
    lengths = torch.randint(0, 13, (40,), generator=gen)
    got = thinking_at_lengths(tokens, lengths, OPEN, CLOSE)
    assert got.tolist() == [thinking_after(False, r[:n].tolist(), OPEN, CLOSE) for r, n in zip(tokens, lengths)]
    # Three sequences of 4, 1 and 5 rows, back to back, with their own start states.
    flat = torch.randint(0, 9, (10,), generator=gen)
    first = t([0] * 4 + [4] + [5] * 5)
    start = t([True] * 4 + [False] + [True] * 5)
    got = thinking_flags_ragged(start, flat, first, OPEN, CLOSE)
    want = [thinking_after(bool(start[n]), flat[first[n]:n + 1].tolist(), OPEN, CLOSE) for n in range(10)]
    assert got.tolist() == want
    assert any(want) and not all(want)


def test_advancing_the_thinking_state_step_by_step_matches_the_host_walk():
    """Committed tokens arrive a few per step (as accepted drafts do); each step folds only the new ones from a
    window that ends at the step's last committed token, and the state always equals the walk over all of them."""
    gen = torch.Generator().manual_seed(5)
    history = torch.randint(0, 9, (6, 60), generator=gen)
    scanned = torch.randint(0, 8, (6,), generator=gen)
    state = thinking_at_lengths(history, scanned, OPEN, CLOSE)
    width = 4
    for _ in range(20):
        upto = (scanned + torch.randint(0, width + 1, (6,), generator=gen)).clamp(max=60)
        start = (upto - width).clamp(min=0)
        window = history.gather(1, (start[:, None] + torch.arange(width)).clamp(max=59))
        state, scanned = advance_thinking(state, scanned, window, start, upto, OPEN, CLOSE)
        assert torch.equal(scanned, upto)
        assert state.tolist() == [thinking_after(False, r[:n].tolist(), OPEN, CLOSE) for r, n in zip(history, upto)]
    # A window that ends before what was already scanned (a prefill chunk) changes nothing.
    same = advance_thinking(state, scanned, window, start - 2, (scanned - 2).clamp(min=0), OPEN, CLOSE)
    assert torch.equal(same[0], state) and torch.equal(same[1], scanned)


def reference_relaxed(logits: Tensor, drafts: Tensor, topk: Tensor, delta: Tensor) -> Tensor:
    probs = logits.softmax(-1)
    draft_logit = logits.gather(-1, drafts[..., None])
    rank = (logits > draft_logit).sum(-1)
    p_draft = probs.gather(-1, drafts[..., None]).squeeze(-1)
    return (rank < topk) & (p_draft >= probs.amax(-1) - delta) & draft_logit.squeeze(-1).isfinite()


def test_relaxed_rule_in_row_chunks_equals_the_softmax_rule(monkeypatch):
    """Chunks of 3 rows at V=1000 (a 12 kB bound): the same verdicts as a whole-batch softmax, for all rows and for
    an index of rows with repeats; the row max comes back for forcing."""
    from vllm_mtp_gemma4.ops import relaxed as relaxed_ops

    monkeypatch.setattr(relaxed_ops, "CHUNK_BYTES", 3 * 4 * 1000)
    assert relaxed_ops.row_chunk(1000) == 3
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(5, 4, 1000, generator=gen) * 3
    logits[0, 0, 17] = float("-inf")
    drafts = torch.where(torch.rand(5, 4, generator=gen) < 0.5, logits.argsort(-1, descending=True)[..., 2],
                         torch.randint(0, 1000, (5, 4), generator=gen))
    drafts[0, 0] = 17
    topk, delta = t([[3], [5], [1], [10], [2]]), t([[0.3], [0.9], [0.0], [1.0], [0.05]])
    got, row_max = relaxed_accepts(logits, drafts, topk, delta)
    want = reference_relaxed(logits, drafts, topk, delta)
    assert torch.equal(got, want) and want.any() and not want.all() and not got[0, 0]
    assert torch.equal(row_max, logits.amax(-1))
    flat = logits.reshape(20, 1000)
    rows = t([19, 3, 3, 0, 7, 12, 12])
    got, _ = relaxed_accepts(flat, drafts.reshape(20)[rows], topk.expand(5, 4).reshape(20)[rows],
                             delta.expand(5, 4).reshape(20)[rows], rows=rows)
    assert torch.equal(got, want.reshape(20)[rows])


def test_strict_ids_per_row_padded():
    drafts = t([[5, 9, 2], [5, 9, 2]])
    per_row = t([[[9, -1]], [[5, 2]]])  # row 0: {9}; row 1: {5, 2}
    assert strict_only(drafts, per_row).tolist() == [[False, True, False], [True, False, True]]
    assert strict_only(drafts, t([2])).tolist() == [[False, False, True]] * 2


def test_forcing_with_repeated_padding_rows_keeps_the_forced_cell():
    logits = torch.zeros(3, 6)
    logits[:, 0] = 2.0
    force_tokens(logits, t([2, 1, 2, 2]), t([4, 3, 4, 4]), t([False, True, True, False]))
    assert logits.argmax(-1).tolist() == [0, 3, 4]
    assert logits[2, 4].item() == pytest.approx(2.0 + 1e4)


def test_v2_forcing_judges_each_relaxed_draft_inside_thinking_once():
    """Three requests back to back (4, 1 and 3 rows): rows judge the next row's draft within their request, inside
    thinking (from the start state and the markers fed so far), for relaxed requests only, strict ids excepted; the
    forced drafts become each row's argmax and every other row keeps its logits."""
    gen = torch.Generator().manual_seed(8)
    logits = torch.randn(8, 12, generator=gen)
    tokens = t([1, 4, OPEN, 4, 9, 2, 4, CLOSE])
    local = t([0, 1, 2, 3, 0, 0, 1, 2])
    start = t([False] * 4 + [True] * 4)
    relaxed = t([True] * 5 + [False] + [True] * 2)
    probs = torch.full((12,), 0.01)
    probs[[0, 4, CLOSE]] = torch.tensor([0.5, 0.3, 0.3])
    logits[:] = probs.log()
    strict_ids = t([[CLOSE, -1]] * 8)
    forced = logits.clone()
    rows = force_relaxed_drafts(forced, tokens, local, start, relaxed, t([3] * 8), t([0.3] * 8), strict_ids, 6,
                                OPEN, CLOSE)
    # Row 0 judges 4 outside thinking; row 1 judges OPEN (outside); row 2 judges 4 right after OPEN: forced.
    # Row 5's request is not relaxed; row 6 judges CLOSE: strict only. Rows 3, 4, 7 judge no draft of theirs.
    assert rows.tolist() == [False, False, True, False, False, False, False, False]
    assert forced[2].argmax().item() == 4
    assert torch.equal(forced[[0, 1, 3, 4, 5, 6, 7]], logits[[0, 1, 3, 4, 5, 6, 7]])
    # A bound below the flagged rows judges only the first ones.
    capped = logits.clone()
    assert not force_relaxed_drafts(capped, tokens, local, start, relaxed, t([3] * 8), t([0.3] * 8), strict_ids, 0,
                                    OPEN, CLOSE).any()


def block_logits(rows: int) -> torch.Tensor:
    """V=8, K=3. Position 0 prefers OPEN (or CLOSE), positions 1-2 prefer token 4 with 2 and 3 close behind."""
    near = torch.log(t([0.02, 0.02, 0.25, 0.2, 0.45, 0.02, 0.02, 0.02]))
    first = torch.full((8,), -20.0)
    last = torch.full((8,), -20.0)
    last[5] = 0.0
    return torch.stack([first, near, near, last]).expand(rows, 4, 8).clone()


def test_thinking_flags_follow_markers_inside_the_row():
    tokens = t([[1, OPEN, 2, CLOSE, 3], [1, 2, CLOSE, 3, OPEN], [1, 2, 3, 4, 5], [1, 2, 3, 4, 5]])
    flags = thinking_flags(t([False, True, True, False]), tokens, OPEN, CLOSE)
    assert flags.tolist() == [[False, True, True, False, False], [True, True, False, False, True],
                              [True] * 5, [False] * 5]


def test_a_thinking_block_opening_in_the_middle_of_the_drafts():
    logits = block_logits(3)
    logits[0, 0, OPEN] = logits[2, 0, CLOSE] = 0.0
    logits[1, 0, 1] = 0.0
    merged = t([[1, OPEN, 2, 3], [1, 1, 2, 3], [1, CLOSE, 2, 3]])
    start = t([False, False, True])
    flags = thinking_flags(start, merged[:, :3], OPEN, CLOSE)
    assert flags.tolist() == [[False, True, True], [False, False, False], [True, False, False]]
    drafts = merged[:, 1:]
    result = verify_relaxed(logits, drafts, t([3, 3, 3]), flags, t([3] * 3), t([0.3] * 3),
                            greedy_verdict(logits, drafts))
    # Row 0 opens a block with its first draft: the next two are judged relaxed and pass. Rows 1-2 stay strict.
    assert result.num_accepted.tolist() == [3, 1, 1]
    assert next_tokens(result).tolist() == [5, 4, 4]


def test_fused_step_relaxes_only_the_rows_it_is_told_to():
    logits = block_logits(3)
    logits[:, 0, OPEN] = 0.0
    drafts = t([[OPEN, 2, 3]] * 3)
    flags = thinking_flags(t([False] * 3), torch.cat([t([[1]] * 3), drafts[:, :2]], 1), OPEN, CLOSE)
    result = verify_step(logits, drafts, t([3, 3, 3]), sampling(3, temperature=t([1.0, 0.0, 0.0])),
                         torch.arange(4).expand(3, 4), RelaxedInputs(flags, t([True, False, True]), t([3, 3, 3]),
                                                                     t([0.3] * 3), NO_IDS))
    # Row 1 is greedy and not opted in: strict. Row 2 is greedy and opted in: relaxed, like the sampled row 0.
    assert result.num_accepted.tolist() == [3, 1, 3]
    assert next_tokens(result).tolist() == [5, 4, 5]


def test_accepted_rows_pad_after_the_next_token():
    verification = Verification(t([0, 2, 3]), t([[7, 8, 9]] * 3), t([6, 6, 6]))
    rows = accepted_rows(t([[1, 2, 3]] * 3), verification)
    assert rows.tolist() == [[7, -1, -1, -1], [1, 2, 9, -1], [1, 2, 3, 6]]


# ---------------------------------------------------------------- no host syncs


def test_ops_trace_as_single_graphs():
    """Dynamo with fullgraph=True refuses .item(), data-dependent branches and data-dependent shapes."""
    torch._dynamo.reset()
    logits = torch.randn(3, 4, 10)
    drafts = torch.randint(0, 10, (3, 3))
    args = (drafts, t([3, 1, 0]), sampling(3, temperature=t([0.0, 0.8, 1.0]), top_k=t([0, 4, 2])),
            torch.arange(4).expand(3, 4),
            RelaxedInputs(torch.ones(3, 3, dtype=torch.bool), t([True] * 3), t([2, 2, 2]), t([0.3, 0.3, 0.3]), NO_IDS))

    def step(logits, *args):
        result = verify_step(logits, *args)
        merged = torch.cat([logits.argmax(-1)[:, :1], drafts], 1)
        return result.num_accepted, next_tokens(result), thinking_flags(args[4].in_thinking[:, 0], merged, OPEN,
                                                                        CLOSE)

    compiled = torch.compile(step, backend="eager", fullgraph=True)
    for got, want in zip(compiled(logits, *args), step(logits, *args)):
        assert torch.equal(got, want)

    def v2_relaxed(logits, tokens, local, start, relaxed, topk, delta, strict_ids):
        forced = logits.clone()
        rows = force_relaxed_drafts(forced, tokens, local, start, relaxed, topk, delta, strict_ids, 4, OPEN, CLOSE)
        return forced, rows

    v2_args = (torch.randn(6, 10), t([1, OPEN, 2, 3, CLOSE, 4]), t([0, 1, 2, 0, 1, 2]), t([False] * 3 + [True] * 3),
               t([True] * 6), t([3] * 6), t([0.5] * 6), t([[CLOSE]] * 6))
    compiled = torch.compile(v2_relaxed, backend="eager", fullgraph=True)
    for got, want in zip(compiled(*v2_args), v2_relaxed(*v2_args)):
        assert torch.equal(got, want)


def test_partial_top_k_matches_the_full_sort():
    gen = torch.Generator().manual_seed(9)
    logits = torch.randn(6, 4, 300, generator=gen) * 2
    args = (t([0.7, 1.0, 0.9, 0.0, 1.2, 0.8]), t([5, 40, 12, 3, 40, 1]), t([0.9, 0.8, 1.0, 1.0, 0.5, 1.0]), None)
    assert torch.equal(process_logits(logits, *args, max_top_k=40), process_logits(logits, *args))


# ---------------------------------------------------------------- adaptive K


def _true_seconds(rows: int, steps: int) -> float:
    """A steady step's cost with the shape measured on the fixture: a fixed part, a part per verified position
    (each row verifies S drafts and its bonus position), and a part per draft step that grows with the batch."""
    return 0.003 + 0.0003 * rows * (1 + steps) + steps * _draft_seconds(rows)


def _draft_seconds(rows: int) -> float:
    return 0.0006 + 0.00005 * rows


def _measured(rows: int, seed: int = 0, noise: float = 0.05, samples: int = 40) -> Tensor:
    """The bucket's row (greedy regime) of a ``StepTimes`` fed noisy steady steps at every S, and draft steps."""
    generator = torch.Generator().manual_seed(seed)
    times = StepTimes(3)
    for _ in range(samples):
        for steps in range(4):
            jitter = 1 + noise * float(torch.randn(1, generator=generator))
            times.observe(False, rows, steps, _true_seconds(rows, steps) * jitter)
            times.observe_draft(False, rows, _draft_seconds(rows) * jitter)
    return times.estimated()[0, batch_bucket(rows)]


def _rate(rows: int, survival: torch.Tensor, plan: DraftPlan) -> float:
    """True expected tokens per second of a plan (its time: the steady step at its S)."""
    gained = sum(float(survival[i, : int(n)].sum()) for i, n in enumerate(plan.counts))
    return (rows + gained) / _true_seconds(rows, plan.steps)


def test_batch_buckets_are_powers_of_two():
    assert [batch_bucket(b) for b in (1, 2, 3, 4, 5, 8, 9, 16, 17, 32, 33)] == [0, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6]


def test_step_times_are_the_fastest_of_the_last_window_per_regime_bucket_and_s():
    times = StepTimes(1, window=5)
    for seconds in (1.5, 0.9, 0.013, 0.500, 0.012):  # first calls, then a stall among ordinary steps
        times.observe(False, 32, 0, seconds)
        times.observe(False, 30, 1, 2 * seconds)  # the same bucket (17-32 rows)
    times.observe(True, 32, 0, 1.0)  # the sampled regime: its own cells
    assert times.estimated()[0, batch_bucket(32), :2].tolist() == pytest.approx([0.012, 0.024])
    for seconds in (0.020, 0.021, 0.022, 0.023, 0.024):  # the window slides: what the machine does now counts
        times.observe(False, 32, 0, seconds)
    assert float(times.estimated()[0, batch_bucket(32), 0]) == pytest.approx(0.020)
    assert times.estimated()[1, batch_bucket(32)].isnan().all()  # fewer than OWN_SAMPLES of S = 0 and S = K


def test_a_bucket_measures_its_own_ends_before_borrowing_a_shape():
    """The S between a bucket's own S = 0 and S = K take the nearest fully measured bucket's shape; until both ends
    are its own (OWN_SAMPLES each), nothing is borrowed: at b=1 drafting is cheap, at b=32 it may cost 3x."""
    times = StepTimes(2)
    for _ in range(OWN_SAMPLES):
        for steps, seconds in enumerate((0.004, 0.005, 0.008)):  # b=1: shape 0, 0.25, 1
            times.observe(False, 1, steps, seconds)
        times.observe(False, 32, 2, 0.030)
    estimated = times.estimated()
    assert estimated[0, batch_bucket(32), :3].isnan().tolist() == [True, True, False]  # S = 0 still to measure
    assert plan_drafts(torch.full((32, 2), 0.9, dtype=torch.float64), estimated[0, batch_bucket(32)]).steps == 0
    for _ in range(OWN_SAMPLES):
        times.observe(False, 32, 0, 0.010)
    assert times.estimated()[0, batch_bucket(32), :3].tolist() == pytest.approx([0.010, 0.015, 0.030])
    for _ in range(OWN_SAMPLES):  # the sampled regime borrows from the greedy one only where it has no bucket
        times.observe(True, 4, 0, 0.010)
        times.observe(True, 4, 2, 0.014)
    assert times.estimated()[1, batch_bucket(4), :3].tolist() == pytest.approx([0.010, 0.011, 0.014])
    assert StepTimes(1).estimated().isnan().all()


@pytest.mark.parametrize("rows", [1, 4, 8, 16, 32])
@pytest.mark.parametrize("acceptance", [0.3, 0.6, 0.9])
def test_plan_is_the_best_fixed_k_or_plain(rows, acceptance):
    """Against every fixed K and plain decoding under the true cost, the plan from noisy measurements is within
    3 % of the best, and it is a plain step whenever plain decoding beats every K by more than that."""
    survival = torch.full((rows, 3), acceptance, dtype=torch.float64).cumprod(dim=1)
    plan = plan_drafts(survival, _measured(rows))
    uniform = [DraftPlan(k, torch.full((rows,), k), 0.0) for k in range(4)]
    best = max(_rate(rows, survival, p) for p in uniform)
    assert _rate(rows, survival, plan) >= 0.97 * best
    if _rate(rows, survival, uniform[0]) > 1.03 * max(_rate(rows, survival, p) for p in uniform[1:]):
        assert plan.steps == 0 and plan.counts.tolist() == [0] * rows


def test_plan_sends_drafts_only_where_they_pay():
    """Rows that accept well verify drafts; rows that never do verify none; counts never exceed S."""
    rates = torch.tensor([0.95] * 6 + [0.02] * 2, dtype=torch.float64)
    survival = rates[:, None].expand(8, 3).cumprod(dim=1)
    plan = plan_drafts(survival, _measured(8, noise=0.02))
    assert plan.steps >= 1 and 0 < plan.tau < 0.9
    assert plan.counts[:6].min() >= 1 and plan.counts[6:].max() == 0
    # tau prices a verified position, not the draft step already run: the true 0.3 ms per position here.
    assert plan.tau == pytest.approx(_rate(8, survival, plan) * 0.0003, rel=0.15)
    assert int(plan.counts.max()) <= plan.steps


def test_unmeasured_s_is_planned_first_the_ends_then_from_k_down():
    times = torch.tensor([0.004, float("nan"), 0.006, float("nan"), 0.001], dtype=torch.float64)
    survival = torch.full((2, 3), 0.01, dtype=torch.float64)
    assert plan_drafts(survival, times).steps == 3
    times[3] = 0.007
    assert plan_drafts(survival, times).steps == 1
    times[0] = float("nan")
    assert plan_drafts(survival, times).steps == 0


def test_exploring_visits_neighbours_three_times_in_four():
    assert [exploring(2, turn, 4) for turn in range(8)] == [1, 3, 1, 0, 1, 3, 1, 4]
    assert [exploring(3, turn, 3) for turn in range(8)] == [2, 2, 2, 0, 2, 2, 2, 1]
    assert [exploring(0, turn, 1) for turn in range(4)] == [1, 1, 1, 1]


def _simulate(true_seconds, rows: int, acceptance: float, steps: int = 1500, seed: int = 0,
              sampled: bool = False) -> tuple[float, list[float], Counter]:
    """A planner driving a simulated engine whose steady step at S is measured at ``true_seconds(S)`` times noise:
    5 % log-normal jitter, one step in ten a stall of 2-4x (another process), and 50x the first time an S is
    measured (a first call). Returns the policy's expected
    tokens per second (its steps at their true cost), every fixed S's, and the S it ran."""
    generator = np.random.default_rng(seed)
    k = 3
    survival = torch.full((rows, k), acceptance, dtype=torch.float64).cumprod(dim=1)
    times, planner = StepTimes(k), Planner(k)
    tokens = seconds = 0.0
    ran: Counter = Counter()
    last, measured = None, set()
    estimated = times.estimated()
    for step in range(steps):
        if step % 16 == 0 or estimated[int(sampled), batch_bucket(rows), : k + 1].isnan().any():  # as the runner
            estimated = times.estimated()
        plan = planner.plan(sampled, survival, estimated[int(sampled)])
        if plan.steps == last:
            stall = generator.uniform(2, 4) if generator.random() < 0.1 else 1.0
            if plan.steps not in measured:  # a shape's first calls: compilation, first allocations
                stall, _ = 50.0, measured.add(plan.steps)
            times.observe(sampled, rows, plan.steps, true_seconds(plan.steps) * generator.lognormal(0, 0.05) * stall)
        if plan.steps:
            times.observe_draft(sampled, rows, 0.1 * true_seconds(0))
        last = plan.steps
        ran[plan.steps] += 1
        tokens += rows + float(survival[:, : plan.steps].sum())
        seconds += true_seconds(plan.steps)
    fixed = [(rows + float(survival[:, :s].sum())) / true_seconds(s) for s in range(k + 1)]
    return tokens / seconds, fixed, ran


@pytest.mark.parametrize(("name", "rows", "acceptance", "shape"), [
    ("b=1 greedy: drafting cheap, K best", 1, 0.85, (1.0, 1.25, 1.5, 1.75)),
    ("b=32 compiled: plain best", 32, 0.85, (1.0, 2.0, 2.8, 3.6)),
    ("b=8 sampled, low acceptance: plain best", 8, 0.35, (1.0, 1.5, 1.9, 2.3)),
    ("in between: S=1 best", 8, 0.6, (1.0, 1.4, 2.0, 2.6)),
])
def test_planner_holds_within_a_few_percent_of_the_best_fixed_s_under_noise(name, rows, acceptance, shape):
    """Whatever S is best, the planner's tokens per second over 1,500 steps measured with noise (seeded; one step in
    ten stalled 2-4x, each S's first measurement 50x) is >= 0.95 of the best fixed S's and >= 0.97 of plain
    decoding's, exploration and start-up included, and it runs the best S in most steps."""
    rate, fixed, ran = _simulate(lambda s: 0.01 * shape[s], rows, acceptance)
    best = max(range(4), key=fixed.__getitem__)
    assert rate >= 0.95 * fixed[best] and rate >= 0.97 * fixed[0], (name, rate, fixed, ran)
    assert ran[best] > 0.75 * sum(ran.values()), (name, ran)


def test_planner_keeps_regimes_apart():
    """One planner, batches of 8 alternating every 20 steps between greedy rows that accept well and sampled rows
    that accept badly (same step costs): each regime settles on its own S (3 and plain)."""
    shape, k = (1.0, 1.4, 1.8, 2.2), 3
    times, planner = StepTimes(k), Planner(k)
    ran: dict[bool, Counter] = {False: Counter(), True: Counter()}
    last = None
    estimated = times.estimated()
    for step in range(1200):
        sampled = step // 20 % 2 == 1
        survival = torch.full((8, k), 0.2 if sampled else 0.9, dtype=torch.float64).cumprod(dim=1)
        if step % 16 == 0 or estimated[int(sampled), batch_bucket(8), : k + 1].isnan().any():  # as the runner
            estimated = times.estimated()
        plan = planner.plan(sampled, survival, estimated[int(sampled)])
        if (sampled, plan.steps) == last:
            times.observe(sampled, 8, plan.steps, 0.01 * shape[plan.steps])
        last = (sampled, plan.steps)
        ran[sampled][plan.steps] += 1
    assert ran[False].most_common(1)[0][0] == 3 and ran[True].most_common(1)[0][0] == 0, ran


def test_adaptive_counts_follow_calibrated_survival():
    confidence = t([[0.9, 0.9, 0.9], [0.5, 0.1, 0.9], [0.2, 0.9, 0.9], [0.3, 0.3, 0.3]])
    calibration = t([[1.0] * 3, [1.0] * 3, [1.0] * 3, [4.0, 4.0, 1.0]])
    chances = draft_chances(confidence, calibration)
    assert chances[3].tolist() == pytest.approx([1.0, 1.0, 0.3])  # capped at 1
    survival = draft_survival(chances)
    # Row 0: 0.9, 0.81, 0.73; row 1: 0.5, 0.05; row 2: 0.2; row 3: 1, 1, 0.3.
    assert choose_num_drafts(survival, 0.3).tolist() == [3, 1, 0, 3]
    assert choose_num_drafts(survival, 0.0).tolist() == [3, 3, 3, 3]  # tau 0: every draft, as fixed K


@pytest.mark.parametrize(("rate", "weight"), [(0.5, 0.02), (0.8, 0.02), (0.3, 0.02), (0.8, 0.2)])
def test_calibrated_chance_converges_to_the_acceptance_rate(rate, weight):
    """A synthetic stream, confidence fixed at 0.4, drafts accepted at a known rate (seeded): the calibrated chance
    q = r * c settles within 0.05 of the rate (its mean over the last 2,000 of 4,000 outcomes), from the optimistic
    start, at the engine-wide weight and at the per-request one."""
    gen = torch.Generator().manual_seed(11)
    outcomes = (torch.rand(4000, generator=gen) < rate).tolist()
    calibration, chances = Calibration.start(4.0), []
    for accepted in outcomes:
        chances.append(min(1.0, calibration.ratio * 0.4))
        calibration = calibration.update(0.4, accepted, weight=weight)
    assert abs(sum(chances[2000:]) / 2000 - rate) < 0.05


def test_calibration_learns_the_assistants_scale_across_confidences():
    """Confidences vary (0.05 to 0.3) and a draft is accepted with probability 3 c: r settles near 3."""
    gen = torch.Generator().manual_seed(12)
    confidence = (0.05 + 0.25 * torch.rand(6000, generator=gen)).tolist()
    accepted = (torch.rand(6000, generator=gen) < 3 * torch.tensor(confidence)).tolist()
    calibration = Calibration.start(1.0)
    ratios = []
    for c, a in zip(confidence, accepted):
        calibration = calibration.update(c, a, weight=0.02)
        ratios.append(calibration.ratio)
    assert abs(sum(ratios[3000:]) / 3000 - 3.0) < 0.2
    assert Calibration(100.0, 1.0).ratio == CALIBRATION_RANGE[1] and Calibration(0.0, 1.0).ratio == 0.25


def test_batch_updates_equal_one_update_at_a_time():
    """The tracker updates a batch's estimates at once: the engine-wide moving average over masked rows in order,
    and per-row calibrations where a mask holds, give the numbers of a loop over rows (to rounding)."""
    gen = torch.Generator().manual_seed(13)
    samples = torch.rand(7, 3, generator=gen, dtype=torch.float64).numpy()
    where = (torch.rand(7, 3, generator=gen) < 0.6).numpy()
    start = np.array([0.8, 0.5, 0.2])
    looped = start.copy()
    for row in range(7):
        for step in range(3):
            if where[row, step]:
                looped[step] += 0.02 * (samples[row, step] - looped[step])
    assert np.allclose(moving_average_in_order(start, samples, where, 0.02), looped, rtol=0, atol=1e-12)

    confidence, accepted = samples, samples > 0.5
    batch = Calibration(np.full((7, 3), 0.4), np.full((7, 3), 0.1)).update(confidence, accepted, 0.2, where)
    for row in range(7):
        for step in range(3):
            one = Calibration(0.4, 0.1)
            if where[row, step]:
                one = one.update(float(confidence[row, step]), bool(accepted[row, step]), 0.2)
            assert batch.ratio[row, step] == pytest.approx(one.ratio, abs=1e-12)


def _vocab_parallel_top1(logits: torch.Tensor, tp: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``logits`` like a vocab-parallel head (equal padded shards), reduce, and combine in rank order."""
    vocab = logits.shape[1]
    shard = -(-vocab // tp)
    stats = []
    for rank in range(tp):
        part = logits[:, rank * shard:(rank + 1) * shard]
        padding = shard - part.shape[1]
        stats.append(shard_top1(F.pad(part, (0, padding), value=1e4), rank * shard, padding))
    return reduce_top1(torch.cat(stats, dim=-1))


@pytest.mark.parametrize("tp", [1, 2, 3, 4])
def test_vocab_parallel_top1_is_the_full_argmax_and_softmax_max(tp):
    logits = torch.randn(64, 1001, generator=torch.Generator().manual_seed(tp)) * 4
    token, prob = _vocab_parallel_top1(logits, tp)
    assert torch.equal(token, logits.argmax(dim=-1))
    torch.testing.assert_close(prob, logits.softmax(dim=-1).max(dim=-1).values)


def test_vocab_parallel_top1_ties_go_to_the_first_token_across_shards():
    logits = torch.zeros(3, 10)
    logits[0, [3, 8]] = 5.0  # tie across the two shards
    logits[1, [5, 6]] = 5.0  # tie inside the second shard
    logits[2, [4, 5]] = 5.0  # tie across the boundary
    token, _ = _vocab_parallel_top1(logits, 2)
    assert token.tolist() == [3, 5, 4] == logits.argmax(dim=-1).tolist()
