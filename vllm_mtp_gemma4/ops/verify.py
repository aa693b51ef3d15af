"""Verify: decide, per row, how many drafts the target accepts and which token it emits next.

Every rule first gives a per-position ``Verdict`` (does draft j+1 pass at position j, and what would be emitted if
the row stopped there); ``resolve`` then stops each row at its first failure or at its own draft count. Keeping
the per-position form lets relaxed acceptance replace the strict rule position by position.

Shapes: target logits/probs [B, K+1, V], drafts [B, K], num_drafts [B] (0 for prefill rows, which forces
acceptance to 0). Slots j >= num_drafts may hold anything. With ``rows`` [B, K+1], the target logits are vLLM's
flat [N, V] instead, slot j of row b at rows[b, j] (``head_indices``): they are then read a chunk of rows at a time
and never gathered into a [B, K+1, V] copy.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from .relaxed import relaxed_accepts, strict_only
from .sampling import SamplingTensors, draw_tokens, uniform_noise


class Verdict(NamedTuple):
    accept: Tensor  # [B, K] bool: draft j+1 passes the test at position j
    emit: Tensor  # [B, K+1] int64: the token emitted if the row stops at position j


class Verification(NamedTuple):
    num_accepted: Tensor  # [B] int64, 0..num_drafts
    recovered: Tensor  # [B, K] the token emitted at each possible first rejection
    bonus: Tensor  # [B] the token after K accepted drafts


def greedy_verdict(target_logits: Tensor, drafts: Tensor, rows: Tensor | None = None) -> Verdict:
    """Accept while the draft is the argmax (first index on ties); emit the argmax."""
    top1 = target_logits.argmax(-1)
    if rows is not None:
        top1 = top1[rows]
    return Verdict(drafts == top1[:, :-1], top1)


def sampled_verdict(draws: Tensor, drafts: Tensor) -> Verdict:
    """Lossless for point-mass drafts (argmax drafting): one draw per position from p~, accept iff it equals d.

    P(accept d) = p~(d). On rejection the emitted token is the draw itself, which is then distributed as p~ given
    != d. That is exactly the speculative-sampling residual for a point mass q = 1[d]:
    max(p~ - q, 0) / Z = p~ * 1[!= d] / (1 - p~(d)). So P(emit x) = p~(x) for every x, and later positions are
    drawn from their own p~, conditional on the accepted prefix. draws[B, K+1] are ``sample_from_probs`` of
    ``process_logits``' p~ with uniforms from ``uniform_noise`` (``draw_tokens`` does both, in chunks).
    """
    return Verdict(drafts == draws[:, :-1], draws)


def relaxed_verdict(
    target_logits: Tensor,
    drafts: Tensor,
    num_drafts: Tensor,
    in_thinking: Tensor,
    topk: Tensor,
    delta: Tensor,
    strict: Verdict,
    strict_ids: Tensor,
    rows: Tensor | None = None,
) -> Verdict:
    """At flagged positions (in_thinking[B, K]) accept what ``strict`` accepts or the relaxed rule does
    (``relaxed.relaxed_accepts``; ``strict_ids`` only strictly: [S] for every row, or [B, S] per row, padded with
    -1); elsewhere ``strict``. The emitted tokens stay the strict rule's. Not lossless: meant for thinking text
    only."""
    has_draft = torch.arange(drafts.shape[1], device=drafts.device) < num_drafts[:, None]
    if strict_ids.dim() == 2:
        strict_drafts = (drafts[:, :, None] == strict_ids[:, None, :]).any(-1)
    else:
        strict_drafts = strict_only(drafts, strict_ids)
    flagged = in_thinking & has_draft & ~strict_drafts
    logits, rows = _flat_rows(target_logits, rows)
    relaxed, _ = relaxed_accepts(logits, drafts, topk[:, None], delta[:, None], rows=rows[:, :-1].reshape(-1))
    return Verdict(strict.accept | (flagged & relaxed), strict.emit)


def resolve(verdict: Verdict, num_drafts: Tensor) -> Verification:
    """Stop each row at its first failed position, or after its own ``num_drafts``."""
    k = verdict.accept.shape[1]
    has_draft = torch.arange(k, device=num_drafts.device) < num_drafts[:, None]
    num_accepted = (verdict.accept & has_draft).long().cumprod(dim=1).sum(dim=1)
    return Verification(num_accepted, verdict.emit[:, :-1], verdict.emit[:, -1])


def next_tokens(verification: Verification) -> Tensor:
    """``concat(recovered, bonus)[num_accepted]``: the token committed after the accepted drafts, [B]."""
    emitted = torch.cat([verification.recovered, verification.bonus[:, None]], dim=1)
    return emitted.gather(1, verification.num_accepted[:, None]).squeeze(1)


def verify_greedy(target_logits: Tensor, drafts: Tensor, num_drafts: Tensor,
                  synthetic: Synthetic | None = None, rows: Tensor | None = None) -> Verification:
    """Greedy rows: accept while d == argmax (with ``synthetic``, at its rates instead)."""
    return resolve(synthetic_verdict(greedy_verdict(target_logits, drafts, rows), synthetic), num_drafts)


def _flat_rows(target_logits: Tensor, rows: Tensor | None) -> tuple[Tensor, Tensor]:
    """(logits[N, V], rows[B, K+1]) for either layout of the target logits (module docstring)."""
    if rows is not None:
        return target_logits, rows
    batch, width, vocab = target_logits.shape
    index = torch.arange(batch * width, device=target_logits.device).view(batch, width)
    return target_logits.reshape(-1, vocab), index


class Synthetic(NamedTuple):
    """vLLM's ``rejection_sample_method: "synthetic"``: draft j+1 is accepted iff uniforms[:, j] < rates[j]."""

    uniforms: Tensor  # [B, K] float64 in (0, 1], counter-based (``SYNTHETIC_STREAM`` at the drafts' positions)
    rates: Tensor  # [K] float64: the conditional rate at each draft position, given the ones before were accepted


SYNTHETIC_STREAM = 1
"""``uniform_noise`` stream of the synthetic accept tests (stream 0 draws the tokens at the same positions)."""


def synthetic_verdict(strict: Verdict, synthetic: Synthetic | None) -> Verdict:
    """``strict`` with its accept tests replaced by ``synthetic``'s (None: ``strict``). The tokens emitted stay the
    strict rule's, the target's own; an accepted draft is kept whatever it is. Not lossless: for benchmarks."""
    if synthetic is None:
        return strict
    k = strict.accept.shape[1]
    accept = synthetic.uniforms[:, :k].to(strict.accept.device) < synthetic.rates[:k].to(strict.accept.device)
    return Verdict(accept, strict.emit)


def accepted_rows(drafts: Tensor, verification: Verification) -> Tensor:
    """[B, K+1] int64: the accepted drafts, then the next token, then ``PLACEHOLDER`` (-1) in the unused slots."""
    k = drafts.shape[1]
    slot = torch.arange(k + 1, device=drafts.device)
    padded = torch.cat([drafts.long(), drafts.new_zeros(drafts.shape[0], 1).long()], dim=1)
    n = verification.num_accepted[:, None]
    rows = torch.where(slot < n, padded, next_tokens(verification)[:, None])
    return torch.where(slot <= n, rows, PLACEHOLDER)


PLACEHOLDER = -1
"""Marks the slots of a row past its next token, as vLLM's rejection sampler does."""


def verify_step(
    target_logits: Tensor,
    drafts: Tensor,
    num_drafts: Tensor,
    sampling: SamplingTensors,
    positions: Tensor | np.ndarray,
    relaxed: RelaxedInputs | None = None,
    max_top_k: int | None = None,
    synthetic: Synthetic | None = None,
    rows: Tensor | None = None,
) -> Verification:
    """The whole verification of one step, greedy and sampled rows together, for argmax drafts.

    Greedy rows get a one-hot p~, so the sampled rule reduces to the greedy one for them. positions[B, K+1] are
    the absolute positions of the tokens being drawn (the noise counters); with ``sampling.seed``, on the host or
    the device (``uniform_noise``), the noise is made there and then moved to the logits' device. With
    ``relaxed``, relaxed acceptance applies at its flagged positions (in_thinking[B, K]) of its rows (rows[B]);
    None means no row is relaxed.
    ``max_top_k`` is ``process_logits``'. ``synthetic`` replaces every accept test (``synthetic_verdict``).
    ``rows``: the flat layout (module docstring). p~ is made and drawn from ``draw_chunk(V)`` positions at a time
    (``draw_tokens``), so no temporary grows with B x K x V.
    """
    logits, rows = _flat_rows(target_logits, rows)
    batch, width = rows.shape

    def per_slot(x: Tensor | None) -> Tensor | None:
        return None if x is None else x[:, None].expand(batch, width).reshape(-1)

    uniforms = torch.as_tensor(uniform_noise(sampling.seed, positions)).to(logits.device, non_blocking=True)
    draws = draw_tokens(logits, rows.reshape(-1), per_slot(sampling.temperature), per_slot(sampling.top_k),
                        per_slot(sampling.top_p), per_slot(sampling.min_p), uniforms.reshape(-1), max_top_k)
    verdict = sampled_verdict(draws.view(batch, width), drafts)
    if relaxed is not None:
        flagged = relaxed.in_thinking & relaxed.rows[:, None]
        verdict = relaxed_verdict(logits, drafts, num_drafts, flagged, relaxed.topk, relaxed.delta, verdict,
                                  relaxed.strict_ids, rows)
    return resolve(synthetic_verdict(verdict, synthetic), num_drafts)


class RelaxedInputs(NamedTuple):
    """Where and how relaxed acceptance applies in ``verify_step``."""

    in_thinking: Tensor  # [B, K] bool: draft j+1 is judged inside a thinking block
    rows: Tensor  # [B] bool: the row is relaxed while it thinks
    topk: Tensor  # [B] int
    delta: Tensor  # [B] float
    strict_ids: Tensor  # [B, S] per row (or [S] for all) ids only the strict rule accepts: closing marker, stop ids


def head_indices(offsets: Tensor, width: int) -> Tensor:
    """[B, width] flat indices of each row's first ``width`` positions, clamped to the row's last one.

    vLLM lays a row's verified logits out as ``[d1..dn positions, bonus]`` with n <= K; these gather them
    left-aligned into [B, K+1] slots. Slots past a row's own positions repeat its last one and are never used.
    Empty rows (offsets[i] == offsets[i+1]) point at index offsets[i] - 1, clamped to 0: the caller masks them.
    """
    index = offsets[:-1, None] + torch.arange(width, device=offsets.device, dtype=offsets.dtype)
    return torch.minimum(index, offsets[1:, None] - 1).clamp(min=0)
