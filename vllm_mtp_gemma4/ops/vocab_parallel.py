"""Greedy drafts from a vocab-parallel head without gathering the logits.

Each rank holds the logits of one slice of the vocabulary. It reduces them to three numbers per row, and
only those cross ranks (``3 * tp_size`` floats per row instead of the vocabulary): the slice's top logit,
its global token id, and the slice's log-sum-exp, from which the global top-1 probability follows.
"""

from __future__ import annotations

import torch


def shard_top1(shard_logits: torch.Tensor, vocab_start: int, num_padding: int = 0) -> torch.Tensor:
    """[N, V_shard] logits of tokens ``vocab_start...`` -> [N, 3] float32: (max, global id, log-sum-exp).

    The last ``num_padding`` columns are padding rows of the head, never a token.
    """
    logits = shard_logits.float()
    if num_padding:
        logits = logits[:, : logits.shape[1] - num_padding]
    top, index = logits.max(dim=-1)
    # float32 holds token ids exactly up to 2**24, far above Gemma's 262,144.
    return torch.stack([top, (index + vocab_start).float(), logits.logsumexp(dim=-1)], dim=-1)


def reduce_top1(gathered: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, tp * 3] (``shard_top1`` of every rank, concatenated in rank order) -> token ids [N] and top-1 probs [N].

    Ties go to the lowest rank, whose ids are the lowest: the full-vocabulary argmax's first-index rule.
    """
    stats = gathered.view(gathered.shape[0], -1, 3)
    rank = stats[:, :, 0].argmax(dim=-1, keepdim=True)
    top = stats[:, :, 0].gather(1, rank).squeeze(1)
    token = stats[:, :, 1].gather(1, rank).squeeze(1).long()
    return token, (top - stats[:, :, 2].logsumexp(dim=-1)).exp()
