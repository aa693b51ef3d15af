"""Per-request state the fused step needs and vLLM's input batch does not keep, cached once per request.

At admission each request gets a slot, and its row of per-slot columns is filled once from its ``SamplingParams``:

- a noise key: the request's ``seed``, or a hash of its request id (unique per request, and the same on every
  tensor-parallel rank, which must all draw the same tokens), so its draws depend only on (key, position);
- its relaxed-acceptance settings (the engine's, overridden by ``SamplingParams.extra_args``) and its strict-only
  ids: the closing thinking marker and the request's own stop ids (``all_stop_token_ids``: the model's EOS ids and
  its ``stop_token_ids``), which relaxed acceptance never accepts;
- ``min_p`` and ``logit_bias``, which vLLM drops from its logits processors whenever speculation is on;
- its draft cap (``extra_args["num_speculative_tokens"]``, 0 = no drafts);
- adaptive K's estimates (acceptance rate and confidence calibration per draft step, from the engine-wide ones at
  admission), updated for the whole batch at once from each step's outcomes;
- its thinking state, on the device: set from the prompt at admission, then advanced by the tokens each step
  commits (never rebuilt from history), so a prompt that ends inside an open block starts in thinking and
  preemption or chunked prefill cannot lose it.

A step's ``RowInputs`` are gathered from the slots of the batch's rows, and reused for as long as the batch holds
the same requests in the same order (a decode run), so a steady step builds nothing in Python per request.
"""

from __future__ import annotations

import hashlib
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from vllm_mtp_gemma4.config import DRAFT_CAP_KEY, PluginConfig
from vllm_mtp_gemma4.ops import GREEDY_TEMPERATURE, Calibration, moving_average_in_order, thinking_flags

INITIAL_CALIBRATION = 4.0
# Optimistic start: drafts get sent, so the outcomes that correct the estimates get observed.
INITIAL_ACCEPTANCE = 0.8
REQUEST_WEIGHT, ENGINE_WEIGHT = 0.2, 0.02  # exponential weights of one outcome, per request and engine-wide
INITIAL_SLOTS = 64  # the slot columns double when more requests are alive (running or preempted) at once


class RowInputs(NamedTuple):
    """The step's per-row inputs, [B] each, on the device unless said."""

    slots: Tensor  # int64 slot of each row (device), for the per-slot thinking state
    key: np.ndarray  # int64 noise key, on the host (the noise is computed there)
    relaxed: Tensor  # bool: relaxed acceptance applies to this row while it thinks
    any_relaxed: bool  # host: whether any row is relaxed
    topk: Tensor  # int64
    delta: Tensor  # float32
    strict_ids: Tensor  # [B, S] int64 ids relaxed acceptance never accepts (padded with -1)
    min_p: Tensor | None  # float32; None when no row uses it
    logit_bias: tuple[Tensor, Tensor] | None  # token ids [B, W] int64, values [B, W] float32 (0-padded); None: unused
    max_top_k: int | None  # host int: the largest top_k of the sampled rows; None when one has none
    draft_caps: list[int] | None  # host: drafts each row may send next; None when no row is capped below K
    vllm_samples: bool  # host: no row needs the plugin's own draws (a seeded sampled row, min_p, logit_bias), so a
    # step without drafts can sample with vLLM's sampler


def request_key(req_id: str) -> int:
    """A 63-bit noise key from a request id: vLLM's ids carry a random part, so keys differ between requests."""
    return int.from_bytes(hashlib.blake2b(req_id.encode(), digest_size=8).digest(), "little") >> 1


def _last_marker_state(tokens: list[int] | None, open_id: int, close_id: int) -> bool:
    """Whether ``tokens`` (a prompt) end inside a thinking block: the last marker decides."""
    if not tokens:
        return False
    ids = np.asarray(tokens)
    markers = np.flatnonzero((ids == open_id) | (ids == close_id))
    return bool(markers.size) and int(ids[markers[-1]]) == open_id


class RequestTracker:
    """Slots per live request, their cached columns, and the batch's ``RowInputs``."""

    def __init__(self, config: PluginConfig, thinking_open_id: int | None, thinking_close_id: int | None,
                 max_k: int, device: torch.device) -> None:
        self.config = config
        self.open_id = thinking_open_id
        self.close_id = thinking_close_id
        self.max_k = max_k
        self.device = device
        self.slot_of: dict[str, int] = {}
        self.free: list[int] = []
        # Engine-wide, per draft step: where a new request's estimates start.
        self.acceptance = np.full(max_k, INITIAL_ACCEPTANCE)
        start = Calibration.start(INITIAL_CALIBRATION)
        self.calibration = Calibration(np.full(max_k, start.accepted), np.full(max_k, start.confidence))
        self._strict_base = [] if thinking_close_id is None else [thinking_close_id]
        self._columns(INITIAL_SLOTS)
        self._batch_ids: list[str] | None = None
        self._batch: RowInputs | None = None
        self._batch_slots = np.zeros(0, np.int64)

    def _columns(self, size: int) -> None:
        """(Re)allocate the per-slot columns at ``size`` slots, keeping what the first slots hold."""
        old = {name: getattr(self, name) for name in ("key", "greedy", "top_k", "relaxed", "topk", "delta", "min_p",
                                                      "cap", "seeded", "strict", "bias_len", "bias_ids", "bias_values",
                                                      "thinking", "slot_acceptance", "calibration_accepted",
                                                      "calibration_confidence", "pending_confidence",
                                                      "pending_count")
               if hasattr(self, name)}
        self.key = np.zeros(size, np.int64)
        self.greedy = np.zeros(size, bool)
        self.top_k = np.zeros(size, np.int64)
        self.relaxed = np.zeros(size, bool)
        self.topk = np.zeros(size, np.int64)
        self.delta = np.zeros(size, np.float32)
        self.min_p = np.zeros(size, np.float32)
        self.cap = np.zeros(size, np.int64)
        self.seeded = np.zeros(size, bool)
        self.strict = np.full((size, old["strict"].shape[1] if old else 1), -1, np.int64)
        self.bias_len = np.zeros(size, np.int64)
        self.bias_ids = np.zeros((size, old["bias_ids"].shape[1] if old else 0), np.int64)
        self.bias_values = np.zeros_like(self.bias_ids, dtype=np.float32)
        self.thinking = torch.zeros(size, dtype=torch.bool, device=self.device)
        # Adaptive K (``ops/adaptive.py``, ``ops/cost.py``), per slot and draft step: the rate at which the request's
        # drafts are accepted (given the ones before were), its calibration of the assistant's confidence, and the
        # confidences of the drafts it has in flight (the first ``pending_count``).
        self.slot_acceptance = np.zeros((size, self.max_k))
        self.calibration_accepted = np.zeros((size, self.max_k))
        self.calibration_confidence = np.ones((size, self.max_k))
        self.pending_confidence = np.zeros((size, self.max_k))
        self.pending_count = np.zeros(size, np.int64)
        for name, column in old.items():
            getattr(self, name)[: len(column)] = column
        self.free += list(range(len(old.get("key", ())), size))[::-1]

    def admit(self, req_id: str, sampling_params: Any, prompt_token_ids: list[int] | None) -> None:
        """Give a new request its slot and fill the slot's columns from its parameters and prompt."""
        if req_id in self.slot_of:  # a resumed request keeps its slot and state
            return
        if not self.free:
            self._columns(2 * len(self.key))
        slot = self.free.pop()
        self.slot_of[req_id] = slot
        params = sampling_params
        relaxed, opted_in = self.config.relaxed_for_request(params.extra_args)
        greedy = params.temperature < GREEDY_TEMPERATURE
        self.key[slot] = request_key(req_id) if params.seed is None else params.seed
        self.greedy[slot] = greedy
        self.seeded[slot] = params.seed is not None and not greedy
        self.top_k[slot] = params.top_k
        self.relaxed[slot] = relaxed.enabled and (opted_in or not greedy)
        self.topk[slot] = relaxed.topk
        self.delta[slot] = relaxed.delta
        self.min_p[slot] = params.min_p
        cap = (params.extra_args or {}).get(DRAFT_CAP_KEY)
        self.cap[slot] = self.max_k if cap is None else min(int(cap), self.max_k)
        self.strict[slot] = -1
        strict = sorted({*self._strict_base, *params.all_stop_token_ids})
        if len(strict) > self.strict.shape[1]:
            self.strict = np.pad(self.strict, ((0, 0), (0, len(strict) - self.strict.shape[1])), constant_values=-1)
        self.strict[slot, : len(strict)] = strict
        self.bias_ids[slot] = 0
        self.bias_values[slot] = 0.0
        bias = params.logit_bias or {}
        self.bias_len[slot] = len(bias)
        if len(bias) > self.bias_ids.shape[1]:
            width = ((0, 0), (0, len(bias) - self.bias_ids.shape[1]))
            self.bias_ids, self.bias_values = np.pad(self.bias_ids, width), np.pad(self.bias_values, width)
        self.bias_ids[slot, : len(bias)] = [int(t) for t in bias]
        self.bias_values[slot, : len(bias)] = [float(v) for v in bias.values()]
        if self.open_id is not None and self.close_id is not None:
            self.thinking[slot] = _last_marker_state(prompt_token_ids, self.open_id, self.close_id)
        self.slot_acceptance[slot] = self.acceptance
        self.calibration_accepted[slot] = self.calibration.accepted
        self.calibration_confidence[slot] = self.calibration.confidence
        self.pending_count[slot] = 0
        self._batch_ids = None  # a slot's columns changed

    def forget(self, req_ids: set[str]) -> None:
        for req_id in req_ids:
            slot = self.slot_of.pop(req_id, None)
            if slot is not None:
                self.free.append(slot)

    def rows(self, req_ids: list[str]) -> RowInputs:
        """The batch's rows' inputs, gathered from their slots when the batch changed, else the last step's."""
        if req_ids == self._batch_ids and self._batch is not None:
            return self._batch
        slots = np.fromiter((self.slot_of[r] for r in req_ids), np.int64, len(req_ids))

        def to(x: np.ndarray) -> Tensor:
            return torch.from_numpy(np.ascontiguousarray(x)).to(self.device, non_blocking=True)

        relaxed = self.relaxed[slots]
        sampled_top_k = self.top_k[slots][~self.greedy[slots]]
        min_p = self.min_p[slots]
        strict = self.strict[slots]
        strict = strict[:, : max(1, int((strict >= 0).sum(axis=1).max(initial=0)))]
        width = int(self.bias_len[slots].max(initial=0))
        caps = self.cap[slots]
        self._batch = RowInputs(
            slots=to(slots),
            key=self.key[slots],
            relaxed=to(relaxed),
            any_relaxed=bool(relaxed.any()),
            topk=to(self.topk[slots]),
            delta=to(self.delta[slots]),
            strict_ids=to(strict),
            min_p=to(min_p) if min_p.any() else None,
            logit_bias=(to(self.bias_ids[slots, :width]), to(self.bias_values[slots, :width])) if width else None,
            max_top_k=int(sampled_top_k.max()) if sampled_top_k.size and sampled_top_k.min() > 0 else None,
            draft_caps=caps.tolist() if (caps < self.max_k).any() else None,
            vllm_samples=not (self.seeded[slots].any() or min_p.any() or width),
        )
        self._batch_ids = list(req_ids)
        self._batch_slots = slots
        return self._batch

    def _slots(self, req_ids: list[str]) -> np.ndarray:
        """The rows' slots: the cached batch's while it holds these requests in this order."""
        if req_ids == self._batch_ids:
            return self._batch_slots
        return np.fromiter((self.slot_of[r] for r in req_ids), np.int64, len(req_ids))

    def thinking_of(self, rows: RowInputs) -> Tensor:
        """[B] bool on the device: whether each row is inside a thinking block after its committed tokens."""
        return self.thinking[rows.slots]

    def advance(self, rows: RowInputs, sampled: Tensor, discarded: Tensor) -> None:
        """Walk the rows' thinking state over the tokens this step committed (sampled[B, K+1], -1 past each row's
        next token; rows where discarded[B], partial prefills, committed nothing). Only relaxed rows read it."""
        if not rows.any_relaxed or self.open_id is None or self.close_id is None:
            return
        before = self.thinking_of(rows)
        after = thinking_flags(before, sampled.long(), self.open_id, self.close_id)[:, -1]
        self.thinking[rows.slots] = torch.where(discarded, before, after)

    def survival(self, req_ids: list[str]) -> np.ndarray:
        """[B, K] float64: each request's chance that its drafts 1..j are all accepted, from its acceptance rates."""
        return self.slot_acceptance[self._slots(req_ids)].cumprod(axis=1)

    def calibrations(self, req_ids: list[str]) -> np.ndarray:
        """[B, K] per-step calibration of each request."""
        slots = self._slots(req_ids)
        return Calibration(self.calibration_accepted[slots], self.calibration_confidence[slots]).ratio

    def observe_acceptance(self, req_ids: list[str], num_drafts: list[int], sampled: Tensor) -> None:
        """Update acceptance rates and calibrations with the outcome of every draft just verified (sampled: host,
        -1 padded), per request and engine-wide (in row order), for the whole batch at once.

        With a accepted out of n, drafts 1..a were accepted and draft a+1 (if a < n) was rejected; later drafts
        were never judged.
        """
        slots = self._slots(req_ids)
        accepted = (sampled != -1).sum(dim=1).numpy() - 1
        judged = np.minimum(np.asarray(num_drafts), accepted + 1)
        step = np.arange(self.max_k)
        was_judged = step < judged[:, None]
        outcome = (step < accepted[:, None]).astype(np.float64)
        rates = self.slot_acceptance[slots]
        self.slot_acceptance[slots] = np.where(was_judged, rates + REQUEST_WEIGHT * (outcome - rates), rates)
        self.acceptance = moving_average_in_order(self.acceptance, outcome, was_judged, ENGINE_WEIGHT)
        # Calibration: only the judged drafts whose confidence is known.
        calibrated = was_judged & (step < self.pending_count[slots, None])
        confidence = self.pending_confidence[slots]
        mine = Calibration(self.calibration_accepted[slots], self.calibration_confidence[slots]).update(
            confidence, outcome, REQUEST_WEIGHT, calibrated)
        self.calibration_accepted[slots], self.calibration_confidence[slots] = mine.accepted, mine.confidence
        engine = self.calibration
        self.calibration = Calibration(
            moving_average_in_order(engine.accepted, outcome, calibrated, ENGINE_WEIGHT),
            moving_average_in_order(engine.confidence, confidence, calibrated, ENGINE_WEIGHT))

    def expect(self, req_ids: list[str], counts: np.ndarray, confidence: np.ndarray | None) -> None:
        """The drafts each request sends next ([B]), and the assistant's confidence in them ([B, >= max count];
        None: not known)."""
        slots = self._slots(req_ids)
        if confidence is None:
            self.pending_count[slots] = 0
            return
        width = min(confidence.shape[1], self.max_k)
        self.pending_confidence[slots, :width] = confidence[:, :width]
        self.pending_count[slots] = np.minimum(counts, width)
