"""Cost-aware speculation: how many draft steps to run and how many drafts each row verifies, from what a step
measurably costs and what each draft is worth.

- **Cost.** ``StepTimes`` keeps, per batch-size bucket (1, 2, 3-4, 5-8, ... rows) and per number of draft steps
  S, an exponentially weighted mean of the seconds a steady step took end to end (scheduler, target,
  verification, drafting, output processing): a step that runs S draft steps and verifies what a step at the same
  S sent. It is a measurement, not a model of how time grows, so it holds whatever the machine and the context
  lengths of the moment make it. A bucket not yet measured at some S borrows its nearest measured neighbour's.
- **Worth.** Row i's j-th draft adds a token with chance ``s_ij``, the chance drafts 1..j are all accepted.
- **Plan.** ``plan_drafts``: for the batch's bucket, the S with the most expected tokens per second,
  ``(B + sum_i sum_{j <= S} s_ij) / T(S)``. S = 0 is a plain step: no draft forward, and nothing but the sampled
  token to verify next step. A bucket's S that has no measurement yet is planned first (K down to 0), and
  ``exploring`` names the S to re-measure now and then, so no measurement goes stale.
- **Per row.** A row verifies its drafts j <= S whose chance reaches ``tau = R* (T(S) - T(S-1) - D) / B``: the
  tokens per second of the plan times what one more verified position costs, D being the measured time of one
  draft step (already spent when the rows choose). The fused step applies the same threshold to the chances it
  learns from the assistant's confidence, once the drafts exist.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

NUM_BUCKETS = 16  # up to 2**15 rows


def batch_bucket(rows: int) -> int:
    """0 for 1 row, 1 for 2, 2 for 3-4, 3 for 5-8, ..."""
    return min(max(rows - 1, 0).bit_length(), NUM_BUCKETS - 1)


@dataclass
class StepTimes:
    """[buckets, K+1] exponentially weighted mean seconds of a steady step; NaN where never measured."""

    max_steps: int
    weight: float = 0.1

    def __post_init__(self) -> None:
        self.seconds = torch.full((NUM_BUCKETS, self.max_steps + 1), float("nan"), dtype=torch.float64)
        self.draft_seconds = torch.full((NUM_BUCKETS,), float("nan"), dtype=torch.float64)  # one draft step

    def observe(self, rows: int, steps: int, seconds: float) -> None:
        cell = self.seconds[batch_bucket(rows), steps]
        self.seconds[batch_bucket(rows), steps] = seconds if cell.isnan() else cell + self.weight * (seconds - cell)

    def observe_draft(self, rows: int, seconds_per_step: float) -> None:
        cell = self.draft_seconds[batch_bucket(rows)]
        self.draft_seconds[batch_bucket(rows)] = (seconds_per_step if cell.isnan()
                                                  else cell + self.weight * (seconds_per_step - cell))

    def estimated(self) -> Tensor:
        """[buckets, K+2]: the measured step seconds by S, then one draft step's. Where a bucket lacks one, the
        nearest fully measured bucket's, scaled by the bucket's own measured cells against it (how S compares
        changes slowly with the batch, so a new batch size starts from its neighbour's plan instead of measuring
        every S first). NaN only while no bucket is fully measured."""
        times = torch.cat([self.seconds, self.draft_seconds[:, None]], dim=1)
        complete = [b for b in range(NUM_BUCKETS) if not times[b].isnan().any()]
        for bucket in range(NUM_BUCKETS):
            row = times[bucket]
            if not complete or not row.isnan().any():
                continue
            near = times[min(complete, key=lambda b: (abs(b - bucket), b))]
            known = ~row.isnan()
            scale = (row[known] / near[known]).mean() if known.any() else 1.0
            times[bucket] = torch.where(known, row, near * scale)
        return times


@dataclass(frozen=True)
class DraftPlan:
    steps: int  # S: draft steps to run now (0: a plain step)
    counts: Tensor  # [B] int64 in 0..S: drafts each row verifies next step
    tau: float  # the chance a verified position must have (for confidence-based counts)


def plan_drafts(survival: Tensor, times: Tensor) -> DraftPlan:
    """The plan with the most expected tokens per second.

    survival: [B, K] host float, non-increasing along K. times: [K+2] the bucket's row of ``StepTimes.estimated``:
    step seconds by S (NaN: not measured yet; the first such S from K down is planned, to measure it), then one
    draft step's seconds.
    """
    rows, max_steps = survival.shape
    s = survival.double()
    seconds, draft = times[: max_steps + 1], times[max_steps + 1]
    unmeasured = [steps for steps in range(max_steps, -1, -1) if seconds[steps].isnan()]
    if unmeasured:
        steps, tau = unmeasured[0], 0.0
    else:
        tokens = rows + torch.cat([s.new_zeros(1), s.sum(dim=0).cumsum(0)])  # [K+1]: every row sending S drafts
        rates = tokens / seconds
        steps = int(rates.argmax())
        tau = 0.0
        if steps:  # what one more verified position costs: one more draft step per row, less the draft step itself
            verified = float(seconds[steps] - seconds[steps - 1]) - (0.0 if draft.isnan() else float(draft))
            tau = float(rates[steps]) * max(0.0, verified) / rows
    counts = (s[:, :steps] >= tau).sum(dim=1) if steps else torch.zeros(rows, dtype=torch.int64)
    return DraftPlan(steps, counts, tau)


def exploring(best: int, turn: int, max_steps: int) -> int:
    """The S to re-measure at exploration number ``turn``: the others than ``best`` in turn."""
    others = [steps for steps in range(max_steps + 1) if steps != best]
    return others[turn % len(others)] if others else best
