"""Per-position thinking state, so relaxed acceptance follows a block that opens or closes inside the drafts."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def thinking_flags(start_state: Tensor, tokens: Tensor, open_id: int, close_id: int) -> Tensor:
    """[B, P] bool: whether each row is inside a thinking block right after ``tokens[:, j]``.

    start_state[B] is the state before ``tokens[:, 0]``; the last open/close marker at or before j decides, and
    with none the start state holds. For verification pass the merged rows without their last slot,
    ``[x0, d1..d(K-1)]``: flag j is then the state in which draft d(j+1) is judged, given that x0..dj were accepted.
    A closing marker is itself judged inside the block, an opening one outside it.
    """
    pos = torch.arange(tokens.shape[1], device=tokens.device)
    is_marker = (tokens == open_id) | (tokens == close_id)
    last = torch.where(is_marker, pos, -1).cummax(dim=1).values
    opened = tokens.gather(1, last.clamp(min=0)) == open_id
    return torch.where(last >= 0, opened, start_state[:, None])


def thinking_after(start: bool, tokens: Sequence[int], open_id: int, close_id: int) -> bool:
    """Host-side state after ``tokens`` (committed ids, in order) given ``start``: the last marker decides."""
    for token in reversed(tokens):
        if token == open_id:
            return True
        if token == close_id:
            return False
    return start


def thinking_at_lengths(token_ids: Tensor, lengths: Tensor, open_id: int, close_id: int) -> Tensor:
    """[R] bool: the state after ``token_ids[r, :lengths[r]]`` (committed ids, from a closed start)."""
    pos = torch.arange(token_ids.shape[1], device=token_ids.device)
    is_marker = ((token_ids == open_id) | (token_ids == close_id)) & (pos < lengths[:, None])
    last = torch.where(is_marker, pos, -1).amax(dim=1)
    return (last >= 0) & (token_ids.gather(1, last.clamp(min=0)[:, None]).squeeze(1) == open_id)


def thinking_flags_ragged(start_state: Tensor, tokens: Tensor, first_row: Tensor, open_id: int,
                          close_id: int) -> Tensor:
    """[N] bool, rows of several sequences back to back: the state right after ``tokens[n]``, given the markers in
    ``tokens[first_row[n]..n]`` (its own sequence's rows so far) and ``start_state[n]`` before its first row."""
    row = torch.arange(tokens.shape[0], device=tokens.device)
    is_marker = (tokens == open_id) | (tokens == close_id)
    last = torch.where(is_marker, row, -1).cummax(dim=0).values
    opened = tokens[last.clamp(min=0)] == open_id
    return torch.where(last >= first_row, opened, start_state)


def advance_thinking(state: Tensor, scanned: Tensor, window: Tensor, window_start: Tensor, upto: Tensor,
                     open_id: int, close_id: int) -> tuple[Tensor, Tensor]:
    """Fold newly committed tokens into per-request thinking states: ([R] state, [R] scanned).

    ``state[r]`` is the state after a request's first ``scanned[r]`` committed tokens, ``window[r, :W]`` its
    committed tokens from position ``window_start[r]`` on. The tokens at positions ``scanned[r]`` to ``upto[r] - 1``
    are folded in (the caller's window must cover them); with none, the state holds.
    """
    pos = window_start[:, None] + torch.arange(window.shape[1], device=window.device)
    new = (pos >= scanned[:, None]) & (pos < upto[:, None])
    is_marker = ((window == open_id) | (window == close_id)) & new
    last = torch.where(is_marker, torch.arange(window.shape[1], device=window.device), -1).amax(1)
    opened = window.gather(1, last.clamp(min=0)[:, None]).squeeze(1) == open_id
    return torch.where(last >= 0, opened, state), torch.maximum(scanned, upto)
