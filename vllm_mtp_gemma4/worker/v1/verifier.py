"""Verification of one speculative step: vLLM's logits in, the plugin's ops deciding.

It subclasses vLLM's ``RejectionSampler`` only to reuse its per-position logits processors (penalties, bad words,
allowed ids, min tokens, each seeing the drafts before it) and its logprobs gathering. ``logit_bias`` goes
onto the raw logits first, before them, as vLLM's sampler orders it (bias, penalties, thinking-budget forcing, then
temperature, ``min_p``, top-k/top-p in ``ops.process_logits``). The decision itself is ``ops.verify_step``: exact
argmax for greedy rows; for sampled rows one counter-based draw per position from the processed target
distribution, accepted iff it equals the draft (lossless for argmax drafts); relaxed acceptance at thinking
positions of opted-in rows; with ``rejection_sample_method: "synthetic"``, every accept test replaced by a
counter-based draw against the configured rate (``ops.synthetic_verdict``; not lossless). Rows without drafts
(prefill, plain decoding steps) go through the same code with zero drafts whenever a sampled row is seeded, so a
seeded request draws the same numbers whatever else shares its step; a step with no drafts and no such row (nor
``min_p`` or ``logit_bias``) is vLLM's own sampler's (the runner's ``_sample``).
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
    SYNTHETIC_STREAM,
    RelaxedInputs,
    SamplingTensors,
    Synthetic,
    Verification,
    accepted_rows,
    add_logit_bias,
    head_indices,
    thinking_flags,
    uniform_noise,
    verify_greedy,
    verify_step,
)
from vllm_mtp_gemma4.worker.v1.requests import RequestTracker, RowInputs


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

    def __init__(self, sampler, tracker: RequestTracker, synthetic_rates: list[float] | None = None) -> None:
        """synthetic_rates: the conditional acceptance rate at each draft position (None: the real tests)."""
        super().__init__(sampler)
        self.tracker = tracker
        self.open_id = tracker.open_id
        self.close_id = tracker.close_id
        self.synthetic_rates = None if synthetic_rates is None else torch.tensor(synthetic_rates, dtype=torch.float64)

    def verify(
        self,
        logits: Tensor,
        metadata: SpecDecodeMetadata | None,
        sampling_metadata: SamplingMetadata,
        rows: RowInputs,
        spec_token_ids: list[list[int]],
        first_position: np.ndarray,
    ) -> tuple[SamplerOutput, Verification]:
        """logits[sum(n_i + 1), V] in vLLM's layout (row i: its n_i draft positions, then its bonus position).

        Returns vLLM's ``SamplerOutput`` (sampled ids [B, K+1], -1 past each row's next token) and the
        verification. first_position[B] (host) is the sequence index of the token each row draws at its slot 0.
        Nothing here reads the device.
        """
        num_rows = rows.key.shape[0]
        device = logits.device
        if metadata is None:
            metadata = no_draft_metadata(num_rows, device)
        counts = metadata.num_draft_tokens
        k = max(counts, default=0)
        want_logprobs = sampling_metadata.max_num_logprobs is not None
        # Left-aligned [B, K+1] slots: slot j of row i judges draft j+1; slot n_i is the bonus position.
        heads = head_indices(F.pad(metadata.cu_num_sampled_tokens, (1, 0)), k + 1)
        num_drafts = torch.tensor(counts, dtype=torch.long).to(device, non_blocking=True)
        scores = logits.to(torch.float32, copy=want_logprobs)
        if rows.logit_bias is not None:  # on the raw logits, before penalties and forcing: vLLM's order
            add_logit_bias(scores, heads, num_drafts + 1, *rows.logit_bias)

        # vLLM's per-position processors, over every position including the bonus one.
        with_bonus = replace(metadata, num_draft_tokens=[n + 1 for n in counts])
        spec_with_bonus = [list(s) + [PLACEHOLDER] for s in spec_token_ids]
        processed = self.apply_logits_processors(
            scores, replace(sampling_metadata, spec_token_ids=spec_with_bonus), with_bonus)

        flat_drafts = F.pad(metadata.draft_token_ids, (0, 1))
        drafts = flat_drafts[head_indices(F.pad(metadata.cu_num_draft_tokens, (1, 0)), k)].long()
        positions = first_position[:, None] + np.arange(k + 1)
        synthetic = None
        if self.synthetic_rates is not None and k:
            synthetic = Synthetic(torch.from_numpy(uniform_noise(rows.key, positions[:, :k], SYNTHETIC_STREAM)),
                                  self.synthetic_rates)

        if sampling_metadata.all_greedy and not rows.any_relaxed:
            verification = verify_greedy(processed, drafts, num_drafts, synthetic, rows=heads)
        else:
            temperature = sampling_metadata.temperature
            if temperature is None:
                temperature = torch.zeros(num_rows, device=device)
            sampling = SamplingTensors(temperature, sampling_metadata.top_k, sampling_metadata.top_p, rows.min_p,
                                       rows.key)
            relaxed = None
            if rows.any_relaxed:
                relaxed = RelaxedInputs(self._thinking(rows, drafts), rows.relaxed, rows.topk, rows.delta,
                                        rows.strict_ids)
            verification = verify_step(processed, drafts, num_drafts, sampling, positions, relaxed, rows.max_top_k,
                                       synthetic, rows=heads)
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
        committed = self.tracker.thinking_of(rows)
        after_drafts = thinking_flags(committed, drafts[:, :-1], self.open_id, self.close_id)
        return torch.cat([committed[:, None], after_drafts], dim=1)
