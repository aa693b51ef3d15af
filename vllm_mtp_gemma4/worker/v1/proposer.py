"""The plugin's Gemma 4 MTP proposer.

It builds on vLLM's ``Gemma4Proposer``, which already wires each draft layer to the target's paged
KV (``draft_kv_blocks``: the last non-KV-shared sliding and full layers, each with its KV group's
block table) and resolves the target's language model through ``get_language_model()``. It adds:

- the centroid-masked head (``use_ordered_embeddings``) on every device: upstream captures CUDA
  graphs for it at load, which fails on CPU; elsewhere than CUDA the sparse argmax (top centroids, then their
  tokens) runs eagerly, where vLLM would fall back to scattering into full-vocabulary logits;
- a start-up log line naming the draft-to-target layer wiring, so a run shows which proposer drafted;
- greedy drafts from the assistant's ``get_top_tokens`` when ``use_local_argmax_reduction`` is set (the plugin sets
  it under tensor parallelism): the plugin's assistant class serves the dense head by a vocab-parallel local argmax
  (``models/gemma4_mtp.py``), where upstream's serves only the centroid head;
- with adaptive K, the assistant's top-1 probability at each draft step (``last_confidence``, [B, steps]),
  which the fused runner turns into a per-request draft count.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from vllm.model_executor.layers.linear import ReplicatedLinear
from vllm.v1.spec_decode.gemma4 import Gemma4Proposer

from vllm_mtp_gemma4.config import SECTION, PluginConfig
from vllm_mtp_gemma4.log import get_logger

logger = get_logger(__name__)


class Gemma4MTPProposer(Gemma4Proposer):
    """Drafts K tokens per request with a Gemma 4 assistant reading the target's KV cache."""

    def __init__(self, vllm_config, device, runner=None) -> None:
        super().__init__(vllm_config, device, runner)
        self.plugin_config = PluginConfig.from_dict((vllm_config.additional_config or {}).get(SECTION, {}))
        self.last_confidence: torch.Tensor | None = None
        self._confidence: list[torch.Tensor] = []

    def load_model(self, target_model: nn.Module) -> None:
        super().load_model(target_model)
        centroids = getattr(self.model, "masked_embedding", None) is not None
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
            "vocab-parallel local" if self.use_local_argmax_reduction and not centroids
            else "centroid-sparse" if centroids else "over full logits",
            wiring,
        )

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
        if self.model.has_centroid_head and not self._centroids_sizes:
            # Without CUDA graphs vLLM would take the full-vocabulary masked scatter; the sparse argmax is the same.
            return self.model.get_top_tokens(hidden_states)
        if not self.plugin_config.adaptive_k or self._centroids_sizes or self.use_heterogeneous_vocab:
            return super()._greedy_sample(hidden_states)
        if self.use_local_argmax_reduction:
            tokens, top1 = self.model.top_tokens_and_probs(hidden_states)
        else:
            top = self.model.compute_logits(hidden_states).float().softmax(dim=-1).max(dim=-1)
            tokens, top1 = top.indices, top.values
        if top1 is not None:  # the centroid head never builds full logits: it gets no confidence
            self._confidence.append(top1)
        return tokens
