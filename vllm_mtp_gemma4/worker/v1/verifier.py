"""Verification of one speculative step: vLLM's logits in, the plugin's ops deciding.

It subclasses vLLM's ``RejectionSampler`` only to reuse its per-position logits processors (penalties, bad words,
allowed ids, min tokens, each seeing the drafts before it) and its logprobs gathering. The decision itself is
``ops.verify_step``: exact argmax for greedy rows; for sampled rows one counter-based draw per position from the
processed target distribution, accepted iff it equals the draft (lossless for argmax drafts); relaxed acceptance
at thinking positions of opted-in rows. Rows without drafts (prefill, plain decoding steps) go through the same
code with zero drafts, so a seeded request draws the same numbers whatever else shares its step.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from vllm.v1.outputs import SamplerOutput
from vllm.v1.sample.metadata import SamplingMetadata
from vllm.v1.sample.rejection_sampler import RejectionSampler
from vllm.v1.spec_decode.metadata import SpecDecodeMetadata

from vllm_mtp_gemma4.ops import (
    PLACEHOLDER,
    RelaxedInputs,
    SamplingTensors,
    Verification,
    accepted_rows,
    add_logit_bias,
    head_indices,
    thinking_flags,
    verify_greedy,
    verify_step,
)
from vllm_mtp_gemma4.worker.v1.requests import RowInputs


def no_draft_metadata(num_rows: int, device: torch.device) -> SpecDecodeMetadata:
    """The spec-decode layout of a step in which no row has drafts: one logits row per request."""
    zeros = torch.zeros(num_rows, dtype=torch.int32, device=device)
    ones = torch.arange(1, num_rows + 1, dtype=torch.int32, device=device)
    rows = torch.arange(num_rows, dtype=torch.int32, device=device)
    return SpecDecodeMetadata(
        draft_token_ids=torch.empty(0, dtype=torch.int32, device=device),
        num_draft_tokens=[0] * num_rows,
        cu_num_draft_tokens=zeros,
        cu_num_sampled_tokens=ones,
        target_logits_indices=torch.empty(0, dtype=torch.int32, device=device),
        bonus_logits_indices=rows,
        logits_indices=rows,
    )


class StepVerifier(RejectionSampler):
    """Decides ``num_accepted`` and the next token for every row of a step."""

    def __init__(self, sampler, thinking_open_id: int | None, thinking_close_id: int | None,
                 strict_ids: list[int]) -> None:
        super().__init__(sampler)
        self.open_id = thinking_open_id
        self.close_id = thinking_close_id
        self.strict_ids = strict_ids

    def verify(
        self,
        logits: Tensor,
        metadata: SpecDecodeMetadata | None,
        sampling_metadata: SamplingMetadata,
        rows: RowInputs,
        spec_token_ids: list[list[int]],
        any_relaxed: bool,
    ) -> tuple[SamplerOutput, Verification]:
        """logits[sum(n_i + 1), V] in vLLM's layout (row i: its n_i draft positions, then its bonus position).

        Returns vLLM's ``SamplerOutput`` (sampled ids [B, K+1], -1 past each row's next token) and the
        verification. Nothing here reads the device.
        """
        num_rows = rows.key.shape[0]
        device = logits.device
        if metadata is None:
            metadata = no_draft_metadata(num_rows, device)
        counts = metadata.num_draft_tokens
        k = max(counts, default=0)
        want_logprobs = sampling_metadata.max_num_logprobs is not None

        # vLLM's per-position processors, over every position including the bonus one.
        with_bonus = replace(metadata, num_draft_tokens=[n + 1 for n in counts])
        spec_with_bonus = [list(s) + [PLACEHOLDER] for s in spec_token_ids]
        processed = self.apply_logits_processors(
            logits.to(torch.float32, copy=want_logprobs),
            replace(sampling_metadata, spec_token_ids=spec_with_bonus),
            with_bonus,
        )

        # Left-aligned [B, K+1] slots: slot j of row i judges draft j+1; slot n_i is the bonus position.
        target = processed[head_indices(F.pad(metadata.cu_num_sampled_tokens, (1, 0)), k + 1)]
        flat_drafts = F.pad(metadata.draft_token_ids, (0, 1))
        drafts = flat_drafts[head_indices(F.pad(metadata.cu_num_draft_tokens, (1, 0)), k)].long()
        num_drafts = torch.tensor(counts, dtype=torch.long).to(device, non_blocking=True)
        if rows.logit_bias is not None:
            add_logit_bias(target, *rows.logit_bias)

        if sampling_metadata.all_greedy and not any_relaxed:
            verification = verify_greedy(target, drafts, num_drafts)
        else:
            temperature = sampling_metadata.temperature
            if temperature is None:
                temperature = torch.zeros(num_rows, device=device)
            sampling = SamplingTensors(temperature, sampling_metadata.top_k, sampling_metadata.top_p, rows.min_p,
                                       rows.key)
            positions = rows.first_position[:, None] + np.arange(k + 1)
            relaxed = None
            if any_relaxed:
                relaxed = RelaxedInputs(self._thinking(rows, drafts), rows.relaxed, rows.topk, rows.delta,
                                        torch.tensor(self.strict_ids, dtype=torch.long, device=device))
            verification = verify_step(target, drafts, num_drafts, sampling, positions, relaxed, rows.max_top_k)
        sampled = accepted_rows(drafts, verification).to(torch.int32)

        logprobs = None
        if want_logprobs:
            source = processed if self.is_processed_logprobs_mode else logits
            logprobs = self._get_logprobs_tensors(
                sampling_metadata.max_num_logprobs, metadata, logits,
                source[metadata.target_logits_indices], source[metadata.bonus_logits_indices], sampled,
            )
        return SamplerOutput(sampled_token_ids=sampled, logprobs_tensors=logprobs), verification

    def _thinking(self, rows: RowInputs, drafts: Tensor) -> Tensor:
        """[B, K]: whether draft j+1 is judged inside a thinking block, given x0, d1..dj were accepted."""
        if self.open_id is None or self.close_id is None or drafts.shape[1] == 0:
            return torch.zeros_like(drafts, dtype=torch.bool)
        after_drafts = thinking_flags(rows.thinking, drafts[:, :-1], self.open_id, self.close_id)
        return torch.cat([rows.thinking[:, None], after_drafts], dim=1)
