"""Relaxed acceptance inside thinking on Model Runner V2, as a V2 logits processor.

V2 verifies drafts with its own rejection sampler (exact argmax for greedy rows, Gumbel-keyed lossless sampling for
the others). A V2 logits processor sees each logits row before temperature and truncation, with the token fed at
that row (``ctx.input_ids``: x0, then the drafts). At a row whose next draft is judged inside a thinking block, for
a request relaxed acceptance applies to, and which the relaxed rule accepts, the draft is
forced (``ops.force_relaxed_drafts``): V2's sampler then accepts it whatever its noise. Everywhere else the logits are
untouched, so V2's own verification decides: a draft is accepted if the strict rule or the relaxed rule accepts it,
and on rejection V2's own token (draw or argmax) is emitted. The same rule as on V1 (``ops/verify.relaxed_verdict``).

Per step it reads, for the relaxed requests only: the tokens committed since their last step (``ThinkingState``),
their rows' ids, and their flagged rows' logits, ``ops.row_chunk`` rows at a time. Per-request settings live in
V2's host-staged buffers, uploaded on steps that admit a request. Forced logits would show in processed logprobs,
a returned sampling mask or another verification method, so the plugin does not register this processor with
those (``patches._fit_to_runner``). Requests' relaxed options are checked at admission for both runners, in one
place (``patches._validate_requests``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from vllm.config import VllmConfig
from vllm.sampling_params import SamplingParams
from vllm.utils.torch_utils import async_tensor_h2d
from vllm.v1.worker.gpu.sample.logits_processor.interface import (
    LogitsContext,
    LogitsProcessor,
    LogitsProcRequestState,
)

from vllm_mtp_gemma4.config import (
    PluginConfig,
    strict_token_ids,
    thinking_marker_ids,
)
from vllm_mtp_gemma4.log import get_logger
from vllm_mtp_gemma4.ops import GREEDY_TEMPERATURE, force_relaxed_drafts

if TYPE_CHECKING:
    from vllm.v1.worker.gpu.buffer_utils import UvaBackedTensor

logger = get_logger(__name__)


class RelaxedAcceptanceProcessor(LogitsProcessor):
    """Forces the drafts that relaxed acceptance accepts; one instance per V2 runner."""

    def __init__(self, vllm_config: VllmConfig, req_states: LogitsProcRequestState) -> None:
        from vllm.tokenizers import cached_tokenizer_from_config
        from vllm.v1.worker.gpu.buffer_utils import UvaBackedTensor

        from vllm_mtp_gemma4.worker.v2.thinking_state import ThinkingState

        config = PluginConfig.from_additional_config(vllm_config.additional_config)
        assert config is not None, "registered only for engines with the plugin's config"
        self.config = config
        tokenizer = cached_tokenizer_from_config(vllm_config.model_config)
        self.open_id, self.close_id = thinking_marker_ids(tokenizer)
        self.base_strict_ids = strict_token_ids(tokenizer, vllm_config.model_config.hf_text_config.eos_token_id)
        self.num_drafts = vllm_config.speculative_config.num_speculative_tokens
        self.device = req_states.device
        n = req_states.max_num_reqs
        self.relaxed = UvaBackedTensor(n, dtype=torch.bool)
        self.topk = UvaBackedTensor(n, dtype=torch.int64)
        self.delta = UvaBackedTensor(n, dtype=torch.float32)
        self.strict_ids: UvaBackedTensor = UvaBackedTensor((n, len(self.base_strict_ids) + 1), dtype=torch.int64)
        self.strict_ids.np[:] = -1
        self.dirty = False
        self.thinking = None
        if None not in (self.open_id, self.close_id):
            self.thinking = ThinkingState(req_states, self.open_id, self.close_id, self.num_drafts + 1)
        logger.info("vllm-mtp-gemma4: relaxed acceptance on Model Runner V2 (thinking markers %s/%s; strict-only: "
                    "the closing marker and each request's stop ids, at least %s)", self.open_id, self.close_id,
                    self.base_strict_ids)

    def add_request(self, req_idx: int, sampling_params: SamplingParams) -> bool:
        settings, opted_in = self.config.relaxed_for_request(sampling_params.extra_args)
        greedy = sampling_params.temperature < GREEDY_TEMPERATURE
        on = settings.enabled and (opted_in or not greedy) and self.thinking is not None
        self.relaxed.np[req_idx] = on
        self.dirty = True
        if not on:
            return False
        self.topk.np[req_idx] = settings.topk
        self.delta.np[req_idx] = settings.delta
        self._set_strict_ids(req_idx, sorted({*self.base_strict_ids, *sampling_params.all_stop_token_ids}))
        self.thinking.add_request(req_idx)
        return True

    def _set_strict_ids(self, req_idx: int, ids: list[int]) -> None:
        from vllm.v1.worker.gpu.buffer_utils import UvaBackedTensor

        table = self.strict_ids
        if len(ids) > table.np.shape[1]:  # a request with more stop ids than any before: widen the table
            wider = UvaBackedTensor((table.np.shape[0], len(ids)), dtype=torch.int64)
            wider.np[:] = -1
            wider.np[:, :table.np.shape[1]] = table.np
            self.strict_ids = table = wider
        table.np[req_idx] = -1
        table.np[req_idx, :len(ids)] = ids

    def apply_staged_writes(self) -> None:
        if self.dirty:
            for buffer in (self.relaxed, self.topk, self.delta, self.strict_ids):
                buffer.copy_to_uva()
            self.dirty = False
        if self.thinking is not None:
            self.thinking.apply_staged_writes()

    def apply(self, logits: torch.Tensor, ctx: LogitsContext) -> torch.Tensor:
        relaxed_reqs = np.flatnonzero(self.relaxed.np[ctx.idx_mapping_np])
        if relaxed_reqs.size == 0 or logits.shape[0] == ctx.idx_mapping_np.shape[0]:
            return logits  # no relaxed request, or no drafts at all in this step
        slots = ctx.idx_mapping[async_tensor_h2d(relaxed_reqs, device=self.device)]
        self.thinking.advance(ctx.idx_mapping_np[relaxed_reqs], slots)

        slot = ctx.expanded_idx_mapping.long()
        force_relaxed_drafts(logits, ctx.input_ids.long(), ctx.expanded_local_pos.long(), self.thinking.inside[slot],
                             self.relaxed.gpu[slot], self.topk.gpu[slot], self.delta.gpu[slot],
                             self.strict_ids.gpu[slot], relaxed_reqs.size * self.num_drafts, self.open_id,
                             self.close_id)
        return logits
