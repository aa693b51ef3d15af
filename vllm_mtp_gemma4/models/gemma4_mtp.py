"""The Gemma 4 assistant (``Gemma4MTPModel``) as the plugin runs it, on both model runners.

vLLM's ``Gemma4MTP`` shards every projection. Two of them sit on each draft step's critical path for almost
no compute: ``pre_projection`` (``[token embedding | target hidden] -> draft hidden``, column-parallel, then an
all-gather) and ``post_projection`` (``draft hidden -> target hidden``, row-parallel, then an all-reduce).
Here both are replicated: every rank holds the whole (small) matrices and computes them alone, which saves
two collectives per draft step and gives every rank the same numbers as a single device. Query heads (each
rank's heads read that rank's shard of the target KV), the MLP and the vocab-parallel head stay sharded;
norms are replicated as in vLLM. Checkpoint keys are unchanged (``pre_projection.weight``,
``post_projection.weight``).

``get_top_tokens`` serves the dense head too (vLLM's serves only the centroid-masked one): greedy drafts by a
local argmax over each rank's vocabulary slice (``ops.vocab_parallel``), so only (max, id, log-sum-exp) per rank
cross, never the logits. Both runners call it when ``use_local_argmax_reduction`` is set (the plugin sets it under
tensor parallelism).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size, tensor_model_parallel_all_gather
from vllm.model_executor.layers.linear import ReplicatedLinear
from vllm.model_executor.models import gemma4_mtp

from vllm_mtp_gemma4.log import get_logger
from vllm_mtp_gemma4.ops import reduce_top1, shard_top1

logger = get_logger(__name__)


class Gemma4MTP(gemma4_mtp.Gemma4MTP):
    """vLLM's Gemma 4 assistant with replicated pre/post projections and a local argmax for the dense head."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        predictor = self.model
        predictor.pre_projection = ReplicatedLinear(
            2 * predictor.backbone_hidden_size, predictor.hidden_size, bias=False,
            quant_config=predictor.quant_config, prefix=predictor.pre_projection.prefix)
        predictor.post_projection = ReplicatedLinear(
            predictor.hidden_size, predictor.backbone_hidden_size, bias=False,
            quant_config=predictor.quant_config, prefix=predictor.post_projection.prefix)
        self._shard_suppress_bias: torch.Tensor | None = None

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded = super().load_weights(weights)
        suppress = getattr(self, "_suppress_idx", None)
        if suppress is not None:  # -inf on this rank's vocabulary slice where compute_logits masks
            head = self.lm_head
            start, end = head.shard_indices.org_vocab_start_index, head.shard_indices.org_vocab_end_index
            bias = torch.zeros(head.weight.shape[0], dtype=head.weight.dtype, device=head.weight.device)
            bias[suppress[(suppress >= start) & (suppress < end)] - start] = float("-inf")
            self._shard_suppress_bias = bias
        logger.info("vllm-mtp-gemma4: %s.%s loaded: projections replicated, %s head", type(self).__module__,
                    type(self).__name__, "centroid-masked" if self.has_centroid_head else "dense")
        return loaded

    @property
    def has_centroid_head(self) -> bool:
        return getattr(self, "masked_embedding", None) is not None

    def get_top_tokens(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Greedy draft ids, [T]: the centroid head's sparse argmax, or the dense head's local argmax."""
        return self.top_tokens_and_probs(hidden_states)[0]

    def top_tokens_and_probs(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Greedy draft ids [T] and their softmax probabilities [T] (None for the centroid head, which never builds
        full logits)."""
        if self.has_centroid_head:
            return super().get_top_tokens(hidden_states), None
        head = self.lm_head
        shard_logits = self.logits_processor(head, hidden_states, self._shard_suppress_bias, skip_gather=True)
        stats = shard_top1(shard_logits, head.shard_indices.org_vocab_start_index,
                           head.shard_indices.num_org_vocab_padding)
        if get_tensor_model_parallel_world_size() > 1:
            stats = tensor_model_parallel_all_gather(stats, dim=-1)
        return reduce_top1(stats)
