"""The plugin's Gemma 4 MTP proposer.

It builds on vLLM's ``Gemma4Proposer``, which already wires each draft layer to the target's paged
KV (``draft_kv_blocks``: the last non-KV-shared sliding and full layers, each with its KV group's
block table) and resolves the target's language model through ``get_language_model()``. It adds:

- the centroid-masked head (``use_ordered_embeddings``) on every device: upstream captures CUDA
  graphs for it at load, which fails on CPU; elsewhere than CUDA the sparse argmax runs eagerly;
- a start-up log line naming the draft-to-target layer wiring, so a run shows which proposer drafted;
- greedy drafts from the vocab-parallel head by a local argmax under tensor parallelism (and whenever
  ``use_local_argmax_reduction`` is set): each rank reduces its vocabulary slice to (max, id, log-sum-exp)
  and only those cross ranks (``ops.vocab_parallel``), for the dense head too, where upstream's
  ``get_top_tokens`` exists only for the centroid head; the centroid head keeps upstream's sparse argmax;
- with adaptive K, the assistant's top-1 probability at each draft step (``last_confidence``, [B, steps]),
  which the fused runner turns into a per-request draft count.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from vllm.distributed import get_tensor_model_parallel_world_size, tensor_model_parallel_all_gather
from vllm.model_executor.layers.linear import ReplicatedLinear
from vllm.v1.spec_decode.gemma4 import Gemma4Proposer

from vllm_mtp_gemma4.config import SECTION, PluginConfig
from vllm_mtp_gemma4.log import get_logger
from vllm_mtp_gemma4.ops import reduce_top1, shard_top1

logger = get_logger(__name__)


class Gemma4MTPProposer(Gemma4Proposer):
    """Drafts K tokens per request with a Gemma 4 assistant reading the target's KV cache."""

    def __init__(self, vllm_config, device, runner=None) -> None:
        super().__init__(vllm_config, device, runner)
        self.plugin_config = PluginConfig.from_dict((vllm_config.additional_config or {}).get(SECTION, {}))
        self.last_confidence: torch.Tensor | None = None
        self._confidence: list[torch.Tensor] = []
        self._local_argmax = False
        self._tp_size = 1
        self._suppress_bias: torch.Tensor | None = None

    def load_model(self, target_model: nn.Module) -> None:
        super().load_model(target_model)
        centroids = getattr(self.model, "masked_embedding", None) is not None
        dense_head = not centroids and not self.use_heterogeneous_vocab
        self._tp_size = get_tensor_model_parallel_world_size()
        self._local_argmax = dense_head and (self._tp_size > 1 or self.use_local_argmax_reduction)
        if self._local_argmax:
            self._suppress_bias = self._shard_suppress_bias()
        wiring = {
            i: layer.self_attn.attn.kv_sharing_target_layer_name for i, layer in enumerate(self.model.model.layers)
        }
        logger.info(
            "vllm-mtp-gemma4: Gemma4MTPProposer drafting K=%d with %s on %s, projections %s, centroid head %s, "
            "draft argmax %s, draft layer -> target KV %s", self.num_speculative_tokens,
            f"{type(self.model).__module__}.{type(self.model).__name__}", self.device.type,
            "replicated" if isinstance(self.model.model.pre_projection, ReplicatedLinear)
            and isinstance(self.model.model.post_projection, ReplicatedLinear) else "sharded",
            "on" if centroids else "off",
            "vocab-parallel local" if self._local_argmax else "centroid-sparse" if centroids else "over full logits",
            wiring,
        )

    def _shard_suppress_bias(self) -> torch.Tensor | None:
        """-inf on this rank's slice at the assistant's ``suppress_tokens`` (what ``compute_logits`` masks)."""
        suppress = getattr(self.model, "_suppress_idx", None)
        if suppress is None:
            return None
        head = self.model.lm_head
        start, end = head.shard_indices.org_vocab_start_index, head.shard_indices.org_vocab_end_index
        bias = torch.zeros(head.weight.shape[0], dtype=head.weight.dtype, device=head.weight.device)
        bias[suppress[(suppress >= start) & (suppress < end)] - start] = float("-inf")
        return bias

    def _setup_centroids_cuda_graphs(self) -> None:
        # Without CUDA, ``_greedy_sample`` falls back to ``model.get_top_tokens`` (no graphs captured).
        if self.device.type == "cuda":
            super()._setup_centroids_cuda_graphs()

    def propose(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._confidence = []
        drafts = super().propose(*args, **kwargs)
        self.last_confidence = torch.stack(self._confidence, dim=1) if self._confidence else None
        return drafts

    def _greedy_sample(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self._local_argmax:
            head = self.model.lm_head
            shard_logits = self.model.logits_processor(head, hidden_states, self._suppress_bias, skip_gather=True)
            stats = shard_top1(shard_logits, head.shard_indices.org_vocab_start_index,
                               head.shard_indices.num_org_vocab_padding)
            if self._tp_size > 1:
                stats = tensor_model_parallel_all_gather(stats, dim=-1)
            token, top1 = reduce_top1(stats)
            if self.plugin_config.adaptive_k:
                self._confidence.append(top1)
            return token
        # The centroid head never builds full logits: it gets no confidence.
        if not self.plugin_config.adaptive_k or self._centroids_sizes or self.use_heterogeneous_vocab \
                or getattr(self.model, "masked_embedding", None) is not None:
            return super()._greedy_sample(hidden_states)
        top = self.model.compute_logits(hidden_states).float().softmax(dim=-1).max(dim=-1)
        self._confidence.append(top.values)
        return top.indices
