"""Per-request state the fused step needs and vLLM's input batch does not keep.

- a noise key: the request's ``seed``, or a hash of its request id (unique per request, and the same on every
  tensor-parallel rank, which must all draw the same tokens), so its draws depend only on (key, position);
- its thinking state, walked forward over committed tokens (prompt included), so a prompt that ends inside an open
  block starts in thinking and preemption or chunked prefill cannot lose it;
- its relaxed-acceptance settings (the engine's, overridden by ``SamplingParams.extra_args``);
- ``min_p`` and ``logit_bias``, which vLLM drops from its logits processors whenever speculation is on.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from vllm_mtp_gemma4.config import PluginConfig, RelaxedAcceptance
from vllm_mtp_gemma4.ops import Calibration, thinking_after


@dataclass
class RequestState:
    key: int
    relaxed: RelaxedAcceptance
    relaxed_greedy: bool  # the request opted in itself, which extends relaxed acceptance to greedy rows
    min_p: float
    logit_bias: dict[int, float]
    thinking: bool = False
    scanned: int = 0  # committed tokens already walked for ``thinking``
    # Adaptive K (``ops/adaptive.py``, ``ops/cost.py``): the rate at which its drafts are accepted at each draft
    # step (given the ones before were), how far to trust the assistant's confidence at each step, and the
    # assistant's confidence in the drafts it has in flight.
    acceptance: list[float] = field(default_factory=list)
    calibration: list[Calibration] = field(default_factory=list)
    pending_confidence: list[float] = field(default_factory=list)


INITIAL_CALIBRATION = 4.0
# Optimistic start: drafts get sent, so the outcomes that correct the estimates get observed.
INITIAL_ACCEPTANCE = 0.8
REQUEST_WEIGHT, ENGINE_WEIGHT = 0.2, 0.02  # exponential weights of one outcome, per request and engine-wide


class RowInputs(NamedTuple):
    """The step's per-row inputs, [B] each, on the device unless said."""

    key: np.ndarray  # int64 noise key, on the host (the noise is computed there)
    first_position: np.ndarray  # int64 sequence index of the token drawn at slot 0, on the host
    thinking: Tensor  # bool: inside a thinking block after the committed tokens
    relaxed: Tensor  # bool: relaxed acceptance applies to this row while it thinks
    topk: Tensor  # int64
    delta: Tensor  # float32
    min_p: Tensor | None  # float32; None when no row uses it
    logit_bias: tuple[Tensor, Tensor, Tensor] | None  # (rows, token ids, values); None when no row uses it
    max_top_k: int | None  # host int: the largest top_k of the sampled rows; None when one has none


def request_key(req_id: str) -> int:
    """A 63-bit noise key from a request id: vLLM's ids carry a random part, so keys differ between requests."""
    return int.from_bytes(hashlib.blake2b(req_id.encode(), digest_size=8).digest(), "little") >> 1


class RequestTracker:
    """Keeps ``RequestState`` per request id and turns the batch's rows into ``RowInputs``."""

    def __init__(self, config: PluginConfig, thinking_open_id: int | None, thinking_close_id: int | None,
                 max_k: int) -> None:
        self.config = config
        self.open_id = thinking_open_id
        self.close_id = thinking_close_id
        self.states: dict[str, RequestState] = {}
        # Engine-wide, per draft step: where a new request's estimates start.
        self.acceptance = [INITIAL_ACCEPTANCE] * max_k
        self.calibration = [Calibration.start(INITIAL_CALIBRATION)] * max_k

    def survival(self, req_ids: list[str]) -> Tensor:
        """[B, K] host float64: each request's chance that its drafts 1..j are all accepted, from its acceptance
        rates (new requests start from the engine-wide ones)."""
        rates = []
        for req_id in req_ids:
            state = self.states.get(req_id)
            rates.append(state.acceptance if state is not None else self.acceptance)
        return torch.tensor(rates, dtype=torch.float64).reshape(len(req_ids), len(self.acceptance)).cumprod(dim=1)

    def calibrations(self, req_ids: list[str]) -> list[list[float]]:
        """[B][K] per-step calibration of each request (new ones start from the engine-wide estimate)."""
        rows = []
        for req_id in req_ids:
            state = self.states.get(req_id)
            rows.append([c.ratio for c in (state.calibration if state is not None else self.calibration)])
        return rows

    def observe_acceptance(self, req_ids: list[str], num_drafts: list[int], sampled: Tensor) -> None:
        """Update acceptance rates and calibrations with the outcome of every draft just verified (sampled: host,
        -1 padded).

        With a accepted out of n, drafts 1..a were accepted and draft a+1 (if a < n) was rejected; later drafts
        were never judged.
        """
        accepted = ((sampled != -1).sum(dim=1) - 1).tolist()
        for req_id, n, a in zip(req_ids, num_drafts, accepted):
            state = self.states.get(req_id)
            if state is None or n == 0:
                continue
            judged = min(n, a + 1)
            for step in range(judged):
                outcome = float(step < a)
                state.acceptance[step] += REQUEST_WEIGHT * (outcome - state.acceptance[step])
                self.acceptance[step] += ENGINE_WEIGHT * (outcome - self.acceptance[step])
            for step, confidence in enumerate(state.pending_confidence[:judged]):
                outcome = step < a
                state.calibration[step] = state.calibration[step].update(confidence, outcome, REQUEST_WEIGHT)
                self.calibration[step] = self.calibration[step].update(confidence, outcome, ENGINE_WEIGHT)

    def expect(self, req_ids: list[str], counts: list[int], confidence: list[list[float]] | None) -> None:
        """The drafts each request sends next, and the assistant's confidence in them (None: not known)."""
        for row, (req_id, count) in enumerate(zip(req_ids, counts)):
            state = self.states.get(req_id)
            if state is not None:
                state.pending_confidence = [] if confidence is None else confidence[row][:count]

    def forget(self, req_ids: set[str]) -> None:
        for req_id in req_ids:
            self.states.pop(req_id, None)

    def _state(self, req_id: str, sampling_params: Any) -> RequestState:
        state = self.states.get(req_id)
        if state is None:
            relaxed, opted_in = self.config.relaxed_for_request(sampling_params.extra_args)
            seed = sampling_params.seed
            state = RequestState(
                acceptance=list(self.acceptance),
                calibration=list(self.calibration),
                key=request_key(req_id) if seed is None else seed,
                relaxed=relaxed,
                relaxed_greedy=opted_in,
                min_p=sampling_params.min_p,
                logit_bias={int(k): float(v) for k, v in (sampling_params.logit_bias or {}).items()},
            )
            self.states[req_id] = state
        return state

    def row_inputs(
        self,
        req_ids: list[str],
        sampling_params: list[Any],
        token_ids: np.ndarray,
        num_tokens: np.ndarray,
        temperature_is_greedy: list[bool],
        device: torch.device,
    ) -> tuple[RowInputs, bool]:
        """Inputs for the batch's rows, and whether any row is relaxed (known here, so the device is not asked).

        token_ids[row, :num_tokens[row]] are the row's committed tokens.
        """
        rows = len(req_ids)
        key = np.empty(rows, np.int64)
        thinking = np.zeros(rows, bool)
        relaxed = np.zeros(rows, bool)
        topk = np.empty(rows, np.int64)
        delta = np.empty(rows, np.float32)
        min_p = np.zeros(rows, np.float32)
        bias_rows: list[int] = []
        bias_ids: list[int] = []
        bias_values: list[float] = []
        top_ks = [p.top_k for p, greedy in zip(sampling_params, temperature_is_greedy) if not greedy]
        max_top_k = max(top_ks) if top_ks and min(top_ks) > 0 else None
        for row, (req_id, params) in enumerate(zip(req_ids, sampling_params)):
            state = self._state(req_id, params)
            end = int(num_tokens[row])
            if self.open_id is not None and self.close_id is not None:
                new_tokens = token_ids[row, state.scanned:end].tolist()
                state.thinking = thinking_after(state.thinking, new_tokens, self.open_id, self.close_id)
            state.scanned = end
            key[row] = state.key
            thinking[row] = state.thinking
            relaxed[row] = state.relaxed.enabled and (state.relaxed_greedy or not temperature_is_greedy[row])
            topk[row] = state.relaxed.topk
            delta[row] = state.relaxed.delta
            min_p[row] = state.min_p
            for token_id, value in state.logit_bias.items():
                bias_rows.append(row)
                bias_ids.append(token_id)
                bias_values.append(value)

        def to(x: np.ndarray) -> Tensor:
            return torch.from_numpy(x).to(device, non_blocking=True)

        logit_bias = None
        if bias_rows:
            logit_bias = (
                torch.tensor(bias_rows, device=device),
                torch.tensor(bias_ids, device=device),
                torch.tensor(bias_values, dtype=torch.float32, device=device),
            )
        inputs = RowInputs(
            key=key,
            first_position=num_tokens[:rows].astype(np.int64),
            thinking=to(thinking),
            relaxed=to(relaxed),
            topk=to(topk),
            delta=to(delta),
            min_p=to(min_p) if min_p.any() else None,
            logit_bias=logit_bias,
            max_top_k=max_top_k,
        )
        return inputs, bool(relaxed.any())
