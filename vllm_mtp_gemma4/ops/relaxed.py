"""Relaxed acceptance inside thinking: the per-position rule, shared by both model runners.

A draft d judged inside a thinking block is accepted if the strict rule accepts it **or** the relaxed rule does:
fewer than ``topk`` (the ``relaxed_topk`` setting) tokens have a strictly higher logit (a tie at the topk-th place
is in) and p(d) >= p_top1 - delta, with p the softmax of the logits before temperature and truncation. A draft
the target cannot emit (a -inf logit: grammar, bad words) never passes, and ``strict_ids`` (the closing marker,
EOS) pass only by the strict rule, so relaxation never ends thinking or a response early. On rejection the strict
rule's token is emitted: a sampled row's draw, a greedy row's argmax.
"""

from __future__ import annotations

import torch
from torch import Tensor

FORCE_MARGIN = 1e4
"""Added to the row's largest logit to force a token: beyond any Gumbel noise or temperature the rows can get."""


def relaxed_accepts(logits: Tensor, drafts: Tensor, topk: Tensor, delta: Tensor) -> Tensor:
    """[...] bool: the relaxed rule for drafts[...] under logits[..., V]; topk and delta broadcast to drafts."""
    logits = logits.float()
    draft_logit = logits.gather(-1, drafts[..., None])
    rank = (logits > draft_logit).sum(-1)
    probs = logits.softmax(-1)
    p_draft = probs.gather(-1, drafts[..., None]).squeeze(-1)
    return (rank < topk) & (p_draft >= probs.amax(-1) - delta) & draft_logit.squeeze(-1).isfinite()


def strict_only(drafts: Tensor, strict_ids: Tensor) -> Tensor:
    """[...] bool: drafts that only the strict rule may accept."""
    return torch.isin(drafts, strict_ids)


def force_tokens(logits: Tensor, rows: Tensor, tokens: Tensor) -> None:
    """In place: where rows[N], make tokens[N] the certain choice of logits[N, V] (argmax, and p ~ 1 after any
    temperature, top-k, top-p or min-p), so a verifier of either kind accepts it there."""
    current = logits.gather(1, tokens[:, None]).squeeze(1)
    forced = torch.where(rows, logits.amax(1) + FORCE_MARGIN, current)
    logits.scatter_(1, tokens[:, None], forced[:, None])
