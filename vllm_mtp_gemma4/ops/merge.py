"""Merge: place each row's K draft slots right after its own tokens, so one target forward verifies them.

Every row gets exactly K draft slots, prefill rows included (their slots hold padding and their acceptance is
forced to 0 by ``num_drafts``). The merged layout therefore depends only on the old offsets and K: it is known on
the host without reading the device, and every shape is static.
"""

from __future__ import annotations

import torch
from torch import Tensor


def merged_offsets(offsets: Tensor, k: int) -> Tensor:
    """Row offsets after merging: ``offsets[i] + i*K``. Works on host and device tensors alike."""
    return offsets + k * torch.arange(offsets.shape[0], device=offsets.device, dtype=offsets.dtype)


def merge_drafts(
    tokens: Tensor, offsets: Tensor, draft_tokens: Tensor, num_drafts: Tensor, pad_id: int = 0
) -> tuple[Tensor, Tensor]:
    """Ragged rows ``[own tokens..., d1..dK]``.

    tokens[T]: the flat new tokens (one per decode row, a chunk per prefill row); offsets[B+1]: their row offsets;
    draft_tokens[B, K]; num_drafts[B]: slots ``j >= num_drafts`` get ``pad_id``, so the target never reads stale ids.
    Returns the merged tokens[T + B*K] and their offsets[B+1]. When every row has one token the result is the padded
    form: ``merged.view(B, K + 1)``.
    """
    num_rows, k = draft_tokens.shape
    new_offsets = merged_offsets(offsets, k)
    flat = torch.arange(tokens.shape[0], device=tokens.device, dtype=offsets.dtype)
    row = torch.searchsorted(offsets[1:], flat, right=True)
    slots = tail_indices(new_offsets, k)
    drafts = torch.where(torch.arange(k, device=tokens.device) < num_drafts[:, None], draft_tokens, pad_id)
    # The old tokens and the draft slots together cover every merged position exactly once.
    index = torch.cat([flat + row * k, slots.flatten()]).long()
    merged = tokens.new_zeros(tokens.shape[0] + num_rows * k).scatter(0, index, torch.cat([tokens, drafts.flatten()]))
    return merged, new_offsets


def tail_indices(offsets: Tensor, width: int) -> Tensor:
    """[B, width] flat indices of each row's last ``width`` positions.

    With merged offsets and ``width = K + 1`` these gather the verified positions ``[x_last, d1..dK]`` (tokens,
    logits, hidden states) out of the flat ragged tensors.
    """
    return offsets[1:, None] - width + torch.arange(width, device=offsets.device, dtype=offsets.dtype)



def head_indices(offsets: Tensor, width: int) -> Tensor:
    """[B, width] flat indices of each row's first ``width`` positions, clamped to the row's last one.

    vLLM lays a row's verified logits out as ``[d1..dn positions, bonus]`` with n <= K; these gather them
    left-aligned into [B, K+1] slots. Slots past a row's own positions repeat its last one and are never used.
    Empty rows (offsets[i] == offsets[i+1]) point at index offsets[i] - 1, clamped to 0: the caller masks them.
    """
    index = offsets[:-1, None] + torch.arange(width, device=offsets.device, dtype=offsets.dtype)
    return torch.minimum(index, offsets[1:, None] - 1).clamp(min=0)
