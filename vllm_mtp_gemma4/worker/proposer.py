"""The plugin's Gemma 4 MTP proposer.

It builds on vLLM's ``Gemma4Proposer``, which already wires each draft layer to the target's paged
KV (``draft_kv_blocks``: the last non-KV-shared sliding and full layers, each with its KV group's
block table) and resolves the target's language model through ``get_language_model()``. It adds:

- the centroid-masked head (``use_ordered_embeddings``) on every device: upstream captures CUDA
  graphs for it at load, which fails on CPU; elsewhere than CUDA the sparse argmax runs eagerly;
- a start-up log line naming the draft-to-target layer wiring, so a run shows which proposer drafted.
"""

from __future__ import annotations

import torch.nn as nn
from vllm.v1.spec_decode.gemma4 import Gemma4Proposer

from vllm_mtp_gemma4.config import SECTION, PluginConfig
from vllm_mtp_gemma4.log import get_logger

logger = get_logger(__name__)


class Gemma4MTPProposer(Gemma4Proposer):
    """Drafts K tokens per request with a Gemma 4 assistant reading the target's KV cache."""

    def __init__(self, vllm_config, device, runner=None) -> None:
        super().__init__(vllm_config, device, runner)
        self.plugin_config = PluginConfig.from_dict((vllm_config.additional_config or {}).get(SECTION, {}))

    def load_model(self, target_model: nn.Module) -> None:
        super().load_model(target_model)
        wiring = {
            i: layer.self_attn.attn.kv_sharing_target_layer_name for i, layer in enumerate(self.model.model.layers)
        }
        logger.info(
            "vllm-mtp-gemma4: Gemma4MTPProposer drafting K=%d on %s, centroid head %s, draft layer -> target KV %s",
            self.num_speculative_tokens, self.device.type,
            "on" if getattr(self.model, "masked_embedding", None) is not None else "off", wiring,
        )

    def _setup_centroids_cuda_graphs(self) -> None:
        # Without CUDA, ``_greedy_sample`` falls back to ``model.get_top_tokens`` (no graphs captured).
        if self.device.type == "cuda":
            super()._setup_centroids_cuda_graphs()
