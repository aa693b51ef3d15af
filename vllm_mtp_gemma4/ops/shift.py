"""Shift: turn the verified rows into the draft's step-0 input."""

from __future__ import annotations

import torch
from torch import Tensor


def shift_for_draft(
    merged_tokens: Tensor, num_accepted: Tensor, next_tokens: Tensor, hidden: Tensor
) -> tuple[Tensor, Tensor]:
    """Draft input tokens[B, K+1] and the target hidden state at ``num_accepted``, [B, H].

    merged_tokens[B, K+1] is ``[x0, d1..dK]``; hidden[B, K+1, H] the target's final-norm states at those positions.
    The corrected row is ``[x0, d1..dn, next]``; shifted left by one it pairs hidden h_j with token j+1, so position
    n = num_accepted holds ``(h_n, next)``: the draft's first useful output sits there. Positions after n keep stale
    drafts; the draft has no KV cache of its own, so they cannot leak into position n, and their outputs are
    dropped. Hidden states are gathered, never shifted.
    """
    shifted = torch.cat([merged_tokens[:, 1:], next_tokens[:, None]], dim=1)
    pos = torch.arange(shifted.shape[1], device=shifted.device)
    shifted = torch.where(pos == num_accepted[:, None], next_tokens[:, None], shifted)
    return shifted, gather_at(hidden, num_accepted)


def gather_at(x: Tensor, index: Tensor) -> Tensor:
    """``x[b, index[b]]`` for x[B, P, ...]: e.g. the draft's output at num_accepted."""
    idx = index.reshape(-1, 1, *(1,) * (x.dim() - 2)).expand(x.shape[0], 1, *x.shape[2:])
    return x.gather(1, idx).squeeze(1)
