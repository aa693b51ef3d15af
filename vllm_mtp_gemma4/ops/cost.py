"""Cost-aware speculation: how many draft steps to run and how many drafts each row verifies, from what a step
measurably costs and what each draft is worth.

- **Cost.** ``StepTimes`` keeps, per sampling regime (every row greedy, or not), batch-size bucket (1, 2, 3-4, 5-8,
  ... rows) and number of draft steps S, the last ``WINDOW`` seconds a steady step took end to end (scheduler,
  target, verification, drafting, output processing): a step that runs S draft steps and verifies what a step at
  the same S sent. Its estimate is the fastest of them: another process, or a shape's first call (compilation,
  first allocations), only ever slows a step, so neither a stall nor a window of them moves it, and a cell whose
  first samples were first calls is right again at its next ordinary one. It is a
  measurement, not a model of how time grows, so it holds whatever the machine and the context lengths of the
  moment make it.
- **Own ends first.** A (regime, bucket) measures its own S = K and S = 0 (``OWN_SAMPLES`` each) before it plans
  from anything: how drafting compares with a plain step changes with the batch (at 32 rows a compiled drafting
  step can cost 3x a plain one, at 1 row under 2x), so a shape borrowed whole from another batch size points the
  wrong way. The S between the ends, until measured, take the nearest fully measured bucket's shape between the
  bucket's own ends (linear without one).
- **Worth.** Row i's j-th draft adds a token with chance ``s_ij``, the chance drafts 1..j are all accepted.
- **Plan.** ``plan_drafts``: the S with the most expected tokens per second, ``(B + sum_i sum_{j <= S} s_ij) / T(S)``.
  S = 0 is a plain step: no draft forward, and nothing but the sampled token to verify next step. ``Planner``
  keeps, per (regime, bucket), the S in use and moves only for a gain above ``HYSTERESIS``, and now and then
  (``EXPLORE_EVERY``) re-measures another S: a neighbour of the one in use three times in four, a far one the
  fourth.
- **Per row.** A row verifies its drafts j <= S whose chance reaches ``tau = R* (T(S) - T(S-1) - D) / B``: the
  tokens per second of the plan times what one more verified position costs, D being the measured time of one
  draft step (already spent when the rows choose). The fused step applies the same threshold to the chances it
  learns from the assistant's confidence, once the drafts exist.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

NUM_BUCKETS = 16  # up to 2**15 rows
REGIMES = 2  # 0: every row greedy; 1: some row sampled (verification and acceptance differ)
WINDOW = 9  # step times kept per cell; the estimate is the fastest of them (stalls only add time)
OWN_SAMPLES = 3  # a (regime, bucket)'s own S = 0 and S = K measurements before it plans
HYSTERESIS = 0.03  # another S must promise this much more than the one in use to replace it
EXPLORE_EVERY = 32  # plans of a (regime, bucket) between re-measurements of another S
EXPLORE_HOLD = 2  # steps an exploration runs (the first is not steady: it verifies the previous S's drafts)


def batch_bucket(rows: int) -> int:
    """0 for 1 row, 1 for 2, 2 for 3-4, 3 for 5-8, ..."""
    return min(max(rows - 1, 0).bit_length(), NUM_BUCKETS - 1)


@dataclass
class StepTimes:
    """The last ``WINDOW`` steady step seconds per [regime, bucket, S], and one draft step's per [regime, bucket]."""

    max_steps: int
    window: int = WINDOW

    def __post_init__(self) -> None:
        shape = (REGIMES, NUM_BUCKETS, self.max_steps + 2)  # S = 0..K, then one draft step
        self.samples = torch.full((*shape, self.window), float("nan"), dtype=torch.float64)
        self.counts = torch.zeros(shape, dtype=torch.int64)

    def _put(self, regime: int, bucket: int, column: int, seconds: float) -> None:
        count = int(self.counts[regime, bucket, column])
        self.samples[regime, bucket, column, count % self.window] = seconds
        self.counts[regime, bucket, column] = count + 1

    def observe(self, sampled: bool, rows: int, steps: int, seconds: float) -> None:
        self._put(int(sampled), batch_bucket(rows), steps, seconds)

    def observe_draft(self, sampled: bool, rows: int, seconds_per_step: float) -> None:
        self._put(int(sampled), batch_bucket(rows), self.max_steps + 1, seconds_per_step)

    def estimated(self) -> Tensor:
        """[regimes, buckets, K+2]: step seconds by S, then one draft step's. NaN where a (regime, bucket) has
        fewer than ``OWN_SAMPLES`` of S = 0 or S = K (still to be measured: the planner measures them first) and
        where no draft step was measured; the S in between, where not measured, from the nearest fully measured
        bucket's shape (same regime first), else linear between the ends."""
        k = self.max_steps
        # The fastest of each cell's samples (NaN sorts last, so NaN only where there is none).
        # contiguous: TP ranks broadcast this tensor in place, which a strided view would not receive.
        times = self.samples.sort(dim=-1).values[..., 0].contiguous()
        steps = times[..., : k + 1]
        own = (self.counts[..., 0] >= OWN_SAMPLES) & (self.counts[..., k] >= OWN_SAMPLES)
        complete = [tuple(c) for c in (own & (self.counts[..., : k + 1] > 0).all(dim=-1)).nonzero().tolist()]
        steps[~own] = torch.where(self.counts[~own][:, : k + 1] >= OWN_SAMPLES, steps[~own], float("nan"))
        linear = torch.arange(k + 1, dtype=torch.float64) / k
        for regime, bucket in own.nonzero().tolist():
            row = steps[regime, bucket]
            if not row.isnan().any():
                continue
            near = min(complete, key=lambda c: (c[0] != regime, abs(c[1] - bucket), c), default=None)
            shape = linear
            if near is not None:
                other = steps[near]
                span = other[k] - other[0]
                if span > 0:
                    shape = (other - other[0]) / span
            steps[regime, bucket] = torch.where(row.isnan(), row[0] + (row[k] - row[0]) * shape, row)
        return times


@dataclass(frozen=True)
class DraftPlan:
    steps: int  # S: draft steps to run now (0: a plain step)
    counts: np.ndarray  # [B] int64 in 0..S: drafts each row verifies next step
    tau: float  # the chance a verified position must have (for confidence-based counts)


def expected_rates(survival: np.ndarray, seconds: list[float]) -> list[float]:
    """Expected tokens per second at S = 0..K with every row sending S drafts. survival [B, K], seconds [K+1] (host
    numbers: the plan runs every step, and torch's per-op overhead would be most of its cost)."""
    tokens, rates = float(survival.shape[0]), []
    for steps, gained in enumerate([0.0, *survival.sum(axis=0).tolist()][: len(seconds)]):
        tokens += gained
        rates.append(tokens / seconds[steps])
    return rates


def plan_drafts(survival: Tensor | np.ndarray, times: Tensor | list[float], steps: int | None = None) -> DraftPlan:
    """The plan at ``steps`` draft steps (None: the S with the most expected tokens per second) and its counts.

    survival: [B, K] host float, non-increasing along K. times: [K+2] a (regime, bucket)'s row of
    ``StepTimes.estimated``: step seconds by S (NaN: to be measured; the first such of K, 0, K-1, ..., 1 is
    planned), then one draft step's seconds.
    """
    rows, max_steps = survival.shape
    survival = survival.numpy() if isinstance(survival, Tensor) else survival
    times = times.tolist() if isinstance(times, Tensor) else times
    seconds, draft = times[: max_steps + 1], times[max_steps + 1]
    unmeasured = [n for n in (max_steps, 0, *range(max_steps - 1, 0, -1)) if math.isnan(seconds[n])]
    if unmeasured:
        return DraftPlan(unmeasured[0], np.full(rows, unmeasured[0], np.int64), 0.0)
    rates = expected_rates(survival, seconds)
    steps = max(range(max_steps + 1), key=rates.__getitem__) if steps is None else steps
    tau = 0.0
    if steps:  # what one more verified position costs: one more draft step per row, less the draft step itself
        verified = seconds[steps] - seconds[steps - 1] - (0.0 if math.isnan(draft) else draft)
        tau = rates[steps] * max(0.0, verified) / rows
    counts = (survival[:, :steps] >= tau).sum(axis=1) if steps else np.zeros(rows, np.int64)
    return DraftPlan(steps, counts, tau)


def exploring(current: int, turn: int, max_steps: int) -> int:
    """The S to re-measure at exploration number ``turn`` away from ``current``: its neighbours (alternating) three
    turns in four, and in the fourth the others in turn (a neighbour where there are none)."""
    near = [n for n in (current - 1, current + 1) if 0 <= n <= max_steps]
    far = [n for n in range(max_steps + 1) if abs(n - current) > 1]
    if turn % 4 == 3 and far:
        return far[(turn // 4) % len(far)]
    return near[turn % len(near)] if near else current


@dataclass
class Planner:
    """Per (regime, bucket): the S in use, plans made and explorations; the plan of each step. Deterministic in
    its inputs, so tensor-parallel ranks given the same times and survival plan alike."""

    max_steps: int
    in_use: dict[tuple[int, int], int] = field(default_factory=dict)
    plans: dict[tuple[int, int], int] = field(default_factory=dict)
    explorations: dict[tuple[int, int], int] = field(default_factory=dict)
    _exploring: tuple[int, int] | None = None  # (S, steps left)

    def plan(self, sampled: bool, survival: Tensor | np.ndarray, times: Tensor) -> DraftPlan:
        """This step's plan. survival: [B, K] host; times: ``StepTimes.estimated()[regime]`` [buckets, K+2]."""
        survival = survival.numpy() if isinstance(survival, Tensor) else survival
        rows = survival.shape[0]
        key = (int(sampled), batch_bucket(rows))
        if self._exploring is not None:
            steps, left = self._exploring
            self._exploring = (steps, left - 1) if left > 1 else None
            return DraftPlan(steps, np.full(rows, steps, np.int64), 0.0)
        row = times[key[1]].tolist()
        if any(math.isnan(t) for t in row[: self.max_steps + 1]):  # the bucket's own ends to measure
            return plan_drafts(survival, row)
        plans = self.plans[key] = self.plans.get(key, 0) + 1
        current = self.in_use.get(key)
        rates = expected_rates(survival, row[: self.max_steps + 1])
        best = max(range(self.max_steps + 1), key=rates.__getitem__)
        if current is None or rates[best] > (1 + HYSTERESIS) * rates[current]:
            current = self.in_use[key] = best
        if plans % EXPLORE_EVERY == 0:
            turn = self.explorations[key] = self.explorations.get(key, -1) + 1
            steps = exploring(current, turn, self.max_steps)
            self._exploring = (steps, EXPLORE_HOLD - 1) if EXPLORE_HOLD > 1 else None
            return DraftPlan(steps, np.full(rows, steps, np.int64), 0.0)
        return plan_drafts(survival, row, current)
