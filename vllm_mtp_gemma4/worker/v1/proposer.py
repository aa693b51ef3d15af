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
  which the fused runner turns into a per-request draft count;
- its own K-step draft loop (``propose``). The assistant writes no KV and its draft positions do not advance, so
  every draft step is the same query: one row per request at its last accepted position, reading the target's KV
  up to that position. The loop therefore gathers those B rows before the first step (vLLM's runs the first step
  over all (K+1)*B verified positions and keeps B), builds the attention metadata once for all K steps (vLLM builds
  it twice) and enters the forward context once. Each step is then the model call, the draft argmax and two
  buffer copies.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.nn as nn
from vllm.forward_context import set_forward_context
from vllm.model_executor.layers.linear import ReplicatedLinear
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.sample.metadata import SamplingMetadata
from vllm.v1.spec_decode.gemma4 import Gemma4Proposer

from vllm_mtp_gemma4.config import PluginConfig
from vllm_mtp_gemma4.log import get_logger

logger = get_logger(__name__)


class Gemma4MTPProposer(Gemma4Proposer):
    """Drafts K tokens per request with a Gemma 4 assistant reading the target's KV cache."""

    def __init__(self, vllm_config, device, runner=None) -> None:
        super().__init__(vllm_config, device, runner)
        # None in an engine without the plugin's config: it drafts with vLLM's loop, as it would without the plugin.
        self.plugin_config = PluginConfig.from_additional_config(vllm_config.additional_config)
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
            "draft argmax %s, draft loop %s, draft layer -> target KV %s", self.num_speculative_tokens,
            f"{type(self.model).__module__}.{type(self.model).__name__}", self.device.type,
            "replicated" if isinstance(self.model.model.pre_projection, ReplicatedLinear)
            and isinstance(self.model.model.post_projection, ReplicatedLinear) else "sharded",
            "on" if centroids else "off",
            "vocab-parallel local" if self.use_local_argmax_reduction and not centroids
            else "centroid-sparse" if centroids else "over full logits",
            "vLLM's (no plugin config in this engine)" if self.plugin_config is None else "the plugin's",
            wiring,
        )

    def _setup_centroids_cuda_graphs(self) -> None:
        # Without CUDA, ``_greedy_sample`` falls back to ``model.get_top_tokens`` (no graphs captured).
        if self.device.type == "cuda":
            super()._setup_centroids_cuda_graphs()

    def propose(
        self,
        num_speculative_tokens: int,
        target_token_ids: torch.Tensor,
        target_positions: torch.Tensor,
        target_hidden_states: torch.Tensor,
        next_token_ids: torch.Tensor,
        token_indices_to_sample: torch.Tensor | None,
        common_attn_metadata: CommonAttentionMetadata,
        sampling_metadata: SamplingMetadata,
        mm_embed_inputs: Any = None,
        num_rejected_tokens_gpu: torch.Tensor | None = None,
        slot_mappings: Any = None,
    ) -> torch.Tensor:
        """[B, num_speculative_tokens] drafts: K steps of the assistant from each request's last accepted position.

        Called by vLLM's ``propose_draft_token_ids`` with its padded-batch inputs: ``token_indices_to_sample`` marks
        each request's last accepted position among the verified ones (None: the last scheduled token) and
        ``num_rejected_tokens_gpu`` how many verified positions after it were rejected.
        """
        if self.plugin_config is None:
            return super().propose(
                num_speculative_tokens, target_token_ids, target_positions, target_hidden_states, next_token_ids,
                token_indices_to_sample, common_attn_metadata, sampling_metadata, mm_embed_inputs,
                num_rejected_tokens_gpu, slot_mappings)
        self.num_speculative_tokens = num_speculative_tokens
        self._last_draft_probs = None
        self._confidence = []
        self.last_confidence = None
        cad = common_attn_metadata
        batch_size = cad.batch_size()
        rows = cad.query_start_loc[1:] - 1 if token_indices_to_sample is None else token_indices_to_sample
        # The one query per request sees the target's KV up to and including its last accepted position.
        seq_lens = cad.seq_lens if num_rejected_tokens_gpu is None else cad.seq_lens - num_rejected_tokens_gpu
        draft_cad = replace(
            cad, query_start_loc=self.arange[: batch_size + 1],
            query_start_loc_cpu=torch.from_numpy(self.token_arange_np[: batch_size + 1]).clone(),
            seq_lens=seq_lens, num_actual_tokens=batch_size, max_query_len=1, slot_mapping=cad.slot_mapping[rows],
        )
        # One dispatch per propose, as in ``dummy_run``: under DP it is a collective, so the counts must agree.
        cudagraph_mode, num_input_tokens, num_tokens_across_dp = self._determine_batch_execution_and_padding(
            batch_size)
        if num_speculative_tokens == 0:
            return next_token_ids.new_empty(batch_size, 0, dtype=torch.int64)
        _, per_layer_attn_metadata = self.build_per_group_and_layer_attn_metadata(draft_cad)

        self.input_ids[:batch_size] = next_token_ids
        self.positions[:batch_size] = target_positions[rows]
        self.hidden_states[:batch_size] = target_hidden_states[rows]
        drafts: list[torch.Tensor] = []
        probs: list[torch.Tensor] = []  # with draft_sample_method "probabilistic", for vLLM's own step (fused: false)
        with set_forward_context(
            per_layer_attn_metadata, self.vllm_config, num_tokens=num_input_tokens,
            num_tokens_across_dp=num_tokens_across_dp, cudagraph_runtime_mode=cudagraph_mode,
            slot_mapping=self._get_slot_mapping(num_input_tokens, draft_cad.slot_mapping),
        ):
            for step in range(num_speculative_tokens):
                draft_hidden, backbone_hidden = self.model(**self._step_inputs(batch_size, num_input_tokens))
                tokens, step_probs = self._sample_draft_tokens(draft_hidden[:batch_size], sampling_metadata)
                drafts.append(tokens)
                if step_probs is not None:
                    probs.append(step_probs)
                if step + 1 < num_speculative_tokens:
                    self.input_ids[:batch_size] = tokens
                    self.hidden_states[:batch_size] = backbone_hidden[:batch_size]
        self.last_confidence = torch.stack(self._confidence, dim=1) if self._confidence else None
        if probs:
            self._last_draft_probs = torch.stack(probs, dim=1)
        return torch.stack(drafts, dim=1)

    def _step_inputs(self, batch_size: int, num_input_tokens: int) -> dict[str, torch.Tensor | None]:
        if self.supports_mm_inputs:  # drafts and sampled tokens are text: no multimodal embeddings to merge
            self.inputs_embeds[:batch_size] = self.model.embed_input_ids(self.input_ids[:batch_size])
            input_ids, inputs_embeds = None, self.inputs_embeds[:num_input_tokens]
        else:
            input_ids, inputs_embeds = self.input_ids[:num_input_tokens], None
        return {"input_ids": input_ids, "positions": self.positions[:num_input_tokens], "inputs_embeds": inputs_embeds,
                "hidden_states": self.hidden_states[:num_input_tokens]}

    def dummy_run(self, num_tokens: int, use_cudagraphs: bool = True, is_graph_capturing: bool = False,
                  slot_mappings: dict[str, torch.Tensor] | None = None) -> None:
        """``propose``'s shape without inputs: one dispatch (a DP collective), then the K model calls."""
        if self.plugin_config is None:
            return super().dummy_run(num_tokens, use_cudagraphs, is_graph_capturing, slot_mappings)
        cudagraph_mode, num_input_tokens, num_tokens_across_dp = self._determine_batch_execution_and_padding(
            num_tokens, use_cudagraphs=use_cudagraphs)
        with set_forward_context(
            None, self.vllm_config, num_tokens=num_input_tokens, num_tokens_across_dp=num_tokens_across_dp,
            cudagraph_runtime_mode=cudagraph_mode, slot_mapping=self._get_slot_mapping(num_input_tokens),
        ):
            for _ in range(1 if is_graph_capturing else self.num_speculative_tokens):
                self.model(**self._step_inputs(0, num_input_tokens))

    def _greedy_sample(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.model.has_centroid_head and not self._centroids_sizes:
            # Without CUDA graphs vLLM would take the full-vocabulary masked scatter; the sparse argmax is the same.
            return self.model.get_top_tokens(hidden_states)
        adaptive = self.plugin_config is not None and self.plugin_config.adaptive_k
        if not adaptive or self._centroids_sizes or self.use_heterogeneous_vocab:
            return super()._greedy_sample(hidden_states)
        if self.use_local_argmax_reduction:
            tokens, top1 = self.model.top_tokens_and_probs(hidden_states)
        else:
            top = self.model.compute_logits(hidden_states).float().softmax(dim=-1).max(dim=-1)
            tokens, top1 = top.indices, top.values
        if top1 is not None:  # the centroid head never builds full logits: it gets no confidence
            self._confidence.append(top1)
        return tokens
