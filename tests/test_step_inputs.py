"""The fused step's per-request inputs (``worker/v1/requests.py``) and the ops they feed, without an engine:
slots filled once at admission, the batch's rows reused while the batch holds, the thinking state advanced by what
a step commits, per-request strict-only ids and draft caps, ``logit_bias`` in vLLM's flat layout, and synthetic
acceptance."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from vllm import SamplingParams

from vllm_mtp_gemma4.config import PluginConfig
from vllm_mtp_gemma4.ops import (
    SYNTHETIC_STREAM,
    Synthetic,
    add_logit_bias,
    greedy_verdict,
    head_indices,
    relaxed_verdict,
    resolve,
    uniform_noise,
    verify_greedy,
)
from vllm_mtp_gemma4.worker.v1.requests import RequestTracker

OPEN, CLOSE, EOS = 5, 6, 1
K = 3


def tracker(relaxed: bool = True) -> RequestTracker:
    return RequestTracker(PluginConfig(relaxed_acceptance=relaxed), OPEN, CLOSE, K, torch.device("cpu"))


def params(**kwargs) -> SamplingParams:
    p = SamplingParams(**{"temperature": 0.8, **kwargs})
    p.update_from_generation_config({"eos_token_id": [EOS, 2]}, EOS)  # as vLLM's front end does
    return p


def test_slots_are_filled_once_and_rows_reused_while_the_batch_holds():
    t = tracker()
    t.admit("a", params(seed=7, min_p=0.1, logit_bias={9: 2.5, 3: -1.0}), [0, OPEN, 4])
    t.admit("b", params(temperature=0.0, stop_token_ids=[11], extra_args={"num_speculative_tokens": 0}), [0, 4])
    rows = t.rows(["a", "b"])
    assert t.rows(["a", "b"]) is rows  # a steady batch builds nothing
    assert rows.key[0] == 7 and rows.any_relaxed and rows.relaxed.tolist() == [True, False]
    assert rows.min_p.tolist() == [np.float32(0.1), 0.0]
    ids, values = rows.logit_bias
    assert ids.tolist() == [[9, 3], [0, 0]] and values.tolist() == [[2.5, -1.0], [0.0, 0.0]]
    # The closing marker, the generation config's EOS ids and the request's own stop ids; -1 pads.
    assert rows.strict_ids.tolist() == [[EOS, 2, CLOSE, -1], [EOS, 2, CLOSE, 11]]
    assert rows.draft_caps == [K, 0]
    assert t.thinking_of(rows).tolist() == [True, False]  # "a"'s prompt ends inside a thinking block
    swapped = t.rows(["b", "a"])
    assert swapped is not rows and swapped.strict_ids.tolist()[0] == [EOS, 2, CLOSE, 11]
    t.forget({"a"})
    t.admit("c", params(), [0])  # reuses "a"'s slot, with nothing of "a" left
    rows = t.rows(["c", "b"])
    assert rows.logit_bias is None and rows.min_p is None and rows.draft_caps == [K, 0]
    assert t.thinking_of(rows).tolist() == [False, False]


def test_slots_grow_past_the_initial_columns():
    t = tracker()
    names = [f"r{i}" for i in range(150)]
    for i, name in enumerate(names):
        t.admit(name, params(logit_bias={i: 1.0} if i == 149 else None), [OPEN] if i % 2 else [0])
    rows = t.rows(names)
    assert t.thinking_of(rows).tolist() == [bool(i % 2) for i in range(150)]
    assert rows.logit_bias[0].shape == (150, 1) and rows.logit_bias[1][-1].item() == 1.0


def test_thinking_advances_by_committed_tokens_only():
    t = tracker()
    for name in "abc":
        t.admit(name, params(), [0])
    rows = t.rows(list("abc"))
    sampled = torch.tensor([[OPEN, 4, -1, -1], [OPEN, 4, CLOSE, 7], [OPEN, -1, -1, -1]])
    t.advance(rows, sampled, discarded=torch.tensor([False, False, True]))  # "c" is a partial prefill
    assert t.thinking_of(rows).tolist() == [True, False, False]
    t.advance(rows, torch.tensor([[CLOSE, -1, -1, -1], [8, -1, -1, -1], [9, -1, -1, -1]]), torch.zeros(3, dtype=bool))
    assert t.thinking_of(rows).tolist() == [False, False, False]


def test_relaxed_acceptance_never_takes_a_rows_own_stop_ids():
    """Row 0 stops on 11 (its stop_token_ids), row 1 does not: the relaxed rule accepts 11 for row 1 only."""
    logits = torch.zeros(2, 2, 16)
    logits[:, 0, 12] = 3.0  # argmax 12; 11 is second and close: relaxed-acceptable, never strictly accepted
    logits[:, 0, 11] = 2.9
    drafts = torch.tensor([[11], [11]])
    strict = greedy_verdict(logits, drafts)
    per_row = torch.tensor([[CLOSE, 11], [CLOSE, -1]])
    one = torch.tensor([1, 1])
    got = resolve(relaxed_verdict(logits, drafts, one, torch.ones(2, 1, dtype=bool), torch.tensor([3, 3]),
                                  torch.tensor([0.5, 0.5]), strict, per_row), one)
    assert got.num_accepted.tolist() == [0, 1]


def test_logit_bias_lands_on_each_rows_own_positions():
    """vLLM's flat layout: rows of 3, 1 and 2 positions; a dense per-row reference."""
    counts = torch.tensor([3, 1, 2])
    logits = torch.randn(int(counts.sum()), 8)
    heads = head_indices(F.pad(counts.cumsum(0), (1, 0)), 4)
    ids = torch.tensor([[2, 5], [0, 0], [7, 2]])
    values = torch.tensor([[1.5, -2.0], [0.0, 0.0], [3.0, 0.25]])
    got = add_logit_bias(logits.clone(), heads, counts, ids, values)
    dense = torch.zeros(3, 8)
    dense.scatter_add_(1, ids, values)
    want = logits + dense.repeat_interleave(counts, dim=0)
    assert torch.equal(got, want)
    assert add_logit_bias(torch.full((1, 4), -torch.inf), heads[:1, :1], torch.tensor([1]),
                          torch.tensor([[0]]), torch.tensor([[0.0]])).isinf().all()  # padding keeps -inf


def test_synthetic_acceptance_follows_the_rates_and_keeps_the_targets_tokens():
    """200,000 rows of 3 drafts, the draft always the target's argmax (strictly always accepted): the accepted share
    per position is the unconditional rate within 0.005 (about 4 standard errors), and on rejection the emitted
    token is the target's."""
    rates = [0.844, 0.599, 0.385]  # Gemma 4 26B-A4B's published per-position acceptance (issue 25)
    conditional = torch.tensor([r / q for r, q in zip(rates, [1.0, *rates[:-1]])], dtype=torch.float64)
    rows = 200_000
    seeds = np.arange(rows, dtype=np.int64)
    positions = np.full((rows, 1), 40) + np.arange(K)
    synthetic = Synthetic(torch.from_numpy(uniform_noise(seeds, positions, SYNTHETIC_STREAM)), conditional)
    logits = torch.zeros(rows, K + 1, 4)
    logits[..., 2] = 1.0
    drafts = torch.full((rows, K), 2)
    got = verify_greedy(logits, drafts, torch.full((rows,), K), synthetic)
    accepted = got.num_accepted
    for j, rate in enumerate(rates):
        assert abs((accepted > j).double().mean().item() - rate) < 0.005
    assert (got.recovered == 2).all() and (got.bonus == 2).all()
    again = verify_greedy(logits, drafts, torch.full((rows,), K), synthetic)
    assert torch.equal(again.num_accepted, accepted)  # counter-based: the same draws every time
