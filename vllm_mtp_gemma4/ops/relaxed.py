"""Relaxed acceptance inside thinking: the per-position rule, shared by both model runners.

A draft d judged inside a thinking block is accepted if the strict rule accepts it **or** the relaxed rule does:
fewer than ``topk`` (the ``relaxed_topk`` setting) tokens have a strictly higher logit (a tie at the topk-th place
is in) and p(d) >= p_top1 - delta, with p the softmax of the logits before temperature and truncation. A draft
the target cannot emit (a -inf logit: grammar, bad words) never passes, and ``strict_ids`` (the closing marker,
the request's stop ids) pass only by the strict rule, so relaxation never ends thinking or a response early. On
rejection the strict rule's token is emitted: a sampled row's draw, a greedy row's argmax.

The rule reads each row's max, log-sum-exp and a count, never a softmax of the row. Rows are taken
``row_chunk(V)`` at a time, so its temporaries stay near two ``CHUNK_BYTES`` blocks (a chunk's rows gathered, and
their exponentials) whatever the batch, K and vocabulary: 137 MiB at V = 262,144.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .thinking import thinking_flags_ragged

FORCE_MARGIN = 1e4
"""Added to the row's largest logit to force a token: beyond any Gumbel noise or temperature the rows can get."""

CHUNK_BYTES = 1 << 26
"""Bound on one chunk's float32 [rows, V] temporary (64 MiB: 64 rows at V = 262,144)."""


COUNT_COLUMNS = 1 << 14
"""Columns per slice of the rank count, whose int64 temporary would otherwise be twice a chunk."""


def row_chunk(vocab_size: int) -> int:
    """Rows per chunk of ``relaxed_accepts`` at this vocabulary size."""
    return max(1, CHUNK_BYTES // (4 * vocab_size))


def relaxed_accepts(logits: Tensor, drafts: Tensor, topk: Tensor, delta: Tensor,
                    rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The relaxed rule for drafts[...] (topk and delta broadcast to drafts): [...] bool, and each judged row's max
    logit [...] (what ``force_tokens`` raises a token above). Row n is logits[..., V] flattened at n, or, with
    ``rows`` [R] (an index into logits[N, V]), logits[rows[n]]."""
    shape = drafts.shape
    vocab = logits.shape[-1]
    flat = logits.reshape(-1, vocab)
    flat_drafts = drafts.reshape(-1)
    flat_topk = topk.expand(shape).reshape(-1)
    flat_delta = delta.expand(shape).reshape(-1)
    accepted, row_max = [], []
    step = row_chunk(vocab)
    for lo in range(0, flat_drafts.shape[0], step):
        chunk = (flat[lo:lo + step] if rows is None else flat[rows[lo:lo + step]]).float()
        draft_logit = chunk.gather(1, flat_drafts[lo:lo + step, None]).squeeze(1)
        top = chunk.amax(1)
        rank = torch.zeros_like(draft_logit, dtype=torch.int64)
        for c in range(0, vocab, COUNT_COLUMNS):  # counting widens bools to int64: in slices, that stays small
            rank += (chunk[:, c:c + COUNT_COLUMNS] > draft_logit[:, None]).sum(1)
        log_total = chunk.sub(top[:, None]).exp_().sum(1).log_() + top  # one [rows, V] temporary
        p_draft, p_top = (draft_logit - log_total).exp(), (top - log_total).exp()
        accepted.append((rank < flat_topk[lo:lo + step]) & (p_draft >= p_top - flat_delta[lo:lo + step])
                        & draft_logit.isfinite())
        row_max.append(top)
        del chunk  # before the next chunk is gathered: one chunk alive at a time
    if not accepted:
        return drafts.new_zeros(shape, dtype=torch.bool), logits.new_zeros(shape, dtype=torch.float32)
    return torch.cat(accepted).reshape(shape), torch.cat(row_max).reshape(shape)


def strict_only(drafts: Tensor, strict_ids: Tensor) -> Tensor:
    """[...] bool: drafts that only the strict rule may accept. ``strict_ids[..., S]`` broadcasts to
    ``drafts.shape + (S,)``: one set for all, or one per row padded with -1."""
    return (drafts[..., None] == strict_ids).any(-1)


def force_tokens(logits: Tensor, rows: Tensor, tokens: Tensor, accept: Tensor, row_max: Tensor | None = None) -> None:
    """In place: where accept[R], make tokens[R] the certain choice of logits[rows[R]] (argmax, and p ~ 1 after any
    temperature, top-k, top-p or min-p), so a verifier of either kind accepts it there. Entries that are not
    accepted change nothing (they may repeat a row: padding). ``row_max`` is each row's max logit, when known."""
    current = logits[rows, tokens]
    top = logits.amax(1)[rows] if row_max is None else row_max
    # Added, not assigned: a padding entry on the same cell as a forced one adds 0 and cannot undo it.
    logits.index_put_((rows, tokens), torch.where(accept, top + FORCE_MARGIN - current, 0.0), accumulate=True)


def force_relaxed_drafts(logits: Tensor, tokens: Tensor, local: Tensor, start_state: Tensor, relaxed: Tensor,
                         topk: Tensor, delta: Tensor, strict_ids: Tensor, max_judged: int, open_id: int,
                         close_id: int) -> Tensor:
    """Model Runner V2's relaxed acceptance on one step's logits rows, in place; returns the [N] rows it forced.

    Rows of several requests back to back: ``tokens[N]`` fed at each row (x0, then the drafts), ``local[N]`` the
    row's offset in its request, and per row its request's thinking state before x0 (``start_state``), whether it
    is relaxed, its ``topk``/``delta`` and its strict-only ids ([N, S], padded with -1). Row n judges the draft fed
    at row n + 1: inside thinking, for a relaxed request, when the relaxed rule accepts it, it is forced. At most
    ``max_judged`` rows are judged (K per relaxed request bounds them), so no host read sizes the work.
    """
    num_rows = tokens.shape[0]
    draft = torch.cat([tokens[1:], tokens.new_full((1,), -1)])
    has_draft = torch.cat([local[1:] == local[:-1] + 1, local.new_zeros(1, dtype=torch.bool)]) & (draft >= 0)
    draft = draft.clamp(min=0)
    row = torch.arange(num_rows, device=tokens.device)
    thinking = thinking_flags_ragged(start_state, tokens, row - local, open_id, close_id)
    flagged = relaxed & has_draft & thinking & ~strict_only(draft, strict_ids)
    rows = flagged.nonzero_static(size=min(num_rows, max_judged), fill_value=num_rows).squeeze(1)
    judged = rows < num_rows
    rows = rows.clamp(max=num_rows - 1)
    accepted, row_max = relaxed_accepts(logits, draft[rows], topk[rows], delta[rows], rows=rows)
    forced = judged & accepted
    force_tokens(logits, rows, draft[rows], forced, row_max)
    return torch.zeros_like(flagged).index_put_((rows,), forced, accumulate=True)
