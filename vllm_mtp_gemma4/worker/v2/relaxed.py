"""Relaxed acceptance inside thinking on Model Runner V2, as a V2 logits processor.

V2 verifies drafts with its own rejection sampler (exact argmax for greedy rows, Gumbel-keyed lossless sampling for
the others). A V2 logits processor sees each logits row before temperature and truncation, with the token fed at
that row (``ctx.input_ids``: x0, then the drafts) and the request's committed tokens (``all_token_ids``). At a row
whose next draft is judged inside a thinking block, for a request relaxed acceptance applies to, and which the
relaxed rule accepts (``ops.relaxed_accepts``), the draft is forced (``ops.force_tokens``): V2's sampler then
accepts it whatever its noise. Everywhere else the logits are untouched, so V2's own verification decides: a draft
is accepted if the strict rule or the relaxed rule accepts it, and on rejection V2's own token (draw or argmax) is
emitted. The same rule as on V1 (``ops/verify.relaxed_verdict``).

The thinking state comes from the device only: the committed tokens before the request's first row this step, then
the rows' own tokens, so it needs no host copy of the sampled tokens (V2 schedules asynchronously), and it follows
preemption, chunked prefill and blocks that open or close inside a run of drafts. Registered per engine (only when
the plugin's config is on and the runner is V2) through ``ModelConfig.logits_processors``.
"""

from __future__ import annotations

import numpy as np
import torch
from vllm.config import VllmConfig
from vllm.sampling_params import SamplingParams
from vllm.tokenizers import cached_tokenizer_from_config
from vllm.v1.worker.gpu.sample.logits_processor.interface import (
    LogitsContext,
    LogitsProcessor,
    LogitsProcRequestState,
)

from vllm_mtp_gemma4.config import PluginConfig, strict_token_ids, thinking_marker_ids
from vllm_mtp_gemma4.log import get_logger
from vllm_mtp_gemma4.ops import (
    GREEDY_TEMPERATURE,
    force_tokens,
    relaxed_accepts,
    strict_only,
    thinking_at_lengths,
    thinking_flags_ragged,
)

logger = get_logger(__name__)


class RelaxedAcceptanceProcessor(LogitsProcessor):
    """Forces the drafts that relaxed acceptance accepts; one instance per V2 runner."""

    def __init__(self, vllm_config: VllmConfig, req_states: LogitsProcRequestState) -> None:
        config = PluginConfig.from_additional_config(vllm_config.additional_config)
        assert config is not None, "registered only for engines with the plugin's config"
        self.config = config
        tokenizer = cached_tokenizer_from_config(vllm_config.model_config)
        self.open_id, self.close_id = thinking_marker_ids(tokenizer)
        self.req_states = req_states
        self.device = req_states.device
        self.strict_ids = torch.tensor(
            strict_token_ids(tokenizer, vllm_config.model_config.hf_text_config.eos_token_id),
            dtype=torch.long, device=self.device)
        # Per request slot, on the host (uploaded whole when a step has relaxed rows).
        self.relaxed = np.zeros(req_states.max_num_reqs, dtype=bool)
        self.topk = np.zeros(req_states.max_num_reqs, dtype=np.int64)
        self.delta = np.zeros(req_states.max_num_reqs, dtype=np.float32)
        logger.info("vllm-mtp-gemma4: relaxed acceptance on Model Runner V2 (thinking markers %s/%s, strict-only "
                    "ids %s)", self.open_id, self.close_id, self.strict_ids.tolist())

    def add_request(self, req_idx: int, sampling_params: SamplingParams) -> bool:
        settings, opted_in = self.config.relaxed_for_request(sampling_params.extra_args)
        greedy = sampling_params.temperature < GREEDY_TEMPERATURE
        on = settings.enabled and (opted_in or not greedy) and None not in (self.open_id, self.close_id)
        self.relaxed[req_idx] = on
        self.topk[req_idx] = settings.topk
        self.delta[req_idx] = settings.delta
        return bool(on)

    def apply(self, logits: torch.Tensor, ctx: LogitsContext) -> torch.Tensor:
        if not self.relaxed[ctx.idx_mapping_np].any():
            return logits
        slot = ctx.expanded_idx_mapping.long()
        local = ctx.expanded_local_pos.long()
        tokens = ctx.input_ids.long()
        # Row n judges the token fed at row n + 1 when that row is the next draft of the same request.
        draft = torch.cat([tokens[1:], tokens.new_full((1,), -1)])
        has_draft = torch.cat([local[1:] == local[:-1] + 1, local.new_zeros(1, dtype=torch.bool)]) & (draft >= 0)

        # Thinking state after row n's token: the committed tokens before the request's first row, then its rows.
        committed = ctx.pos.long() - local
        width = max(1, int(ctx.seq_lens_upper_bound_np.max()))
        history = self.req_states.all_token_ids.gpu[slot, :width]
        start = thinking_at_lengths(history, committed, self.open_id, self.close_id)
        row = torch.arange(tokens.shape[0], device=tokens.device)
        thinking = thinking_flags_ragged(start, tokens, row - local, self.open_id, self.close_id)

        relaxed = torch.from_numpy(self.relaxed).to(self.device, non_blocking=True)[slot]
        topk = torch.from_numpy(self.topk).to(self.device, non_blocking=True)[slot]
        delta = torch.from_numpy(self.delta).to(self.device, non_blocking=True)[slot]
        draft = draft.clamp(min=0)
        flagged = relaxed & has_draft & thinking & ~strict_only(draft, self.strict_ids)
        force_tokens(logits, flagged & relaxed_accepts(logits, draft, topk, delta), draft)
        return logits
