"""Cost-aware speculation: how many drafts each row verifies, from what a step costs and what each draft is worth.

- **Cost.** A step with B rows, N verified positions (B plus the drafts sent) and S draft steps takes, end to end
  (scheduler and output processing included), ``T = theta . [1, B, N, S, S*B]`` seconds. ``StepCost`` fits theta
  by least squares over the engine's own recent pure-decode steps, exponentially forgotten, so it follows the
  machine it runs on and the context lengths of the moment.
- **Worth.** Row i's j-th draft adds a token with chance ``s_ij``, the chance drafts 1..j are all accepted.
- **Plan.** ``plan_drafts`` picks the S and the per-row counts ``k_i <= S`` with the most expected tokens per
  second, ``(B + sum of the chosen s_ij) / T``. For each S it sorts the positions j <= S by ``s`` (a row's ``s``
  only falls with j, so every prefix of that order is a per-row prefix) and takes the best prefix. S = 0 is a plain
  step: no draft forward, and nothing but the sampled token to verify next step.
- **Threshold.** At the best plan a position is worth verifying when its ``s`` exceeds ``tau = R* dT/dN``, the
  tokens per second the plan achieves times the cost of one more verified position; the fused step applies it to
  the chances it learns from the assistant's confidence once the drafts exist.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

NUM_FEATURES = 5


def step_features(rows: int, positions: int, steps: int) -> Tensor:
    """[5] float64: ``[1, B, N, S, S*B]``."""
    return torch.tensor([1.0, rows, positions, steps, steps * rows], dtype=torch.float64)


@dataclass(frozen=True)
class CostFit:
    """A fitted cost: ``theta`` [5] seconds per feature, and ``floor``, the fastest step seen (no prediction goes
    below it, where a fit extrapolates beyond the steps it saw)."""

    theta: Tensor
    floor: float

    def seconds(self, rows: int, positions: Tensor | int, steps: int) -> Tensor:
        """Predicted step seconds for each N in ``positions``."""
        n = torch.as_tensor(positions, dtype=torch.float64)
        t = self.theta[0] + self.theta[1] * rows + self.theta[2] * n + steps * (self.theta[3] + self.theta[4] * rows)
        return t.clamp(min=self.floor)

    def to_tensor(self) -> Tensor:
        """[6] float64, for a broadcast between ranks."""
        return torch.cat([self.theta, self.theta.new_tensor([self.floor])])

    @classmethod
    def from_tensor(cls, packed: Tensor) -> CostFit:
        return cls(packed[:NUM_FEATURES].clone(), float(packed[NUM_FEATURES]))


@dataclass
class StepCost:
    """Exponentially forgotten least squares of step seconds on ``step_features``.

    ``forget`` near 1 keeps about ``1 / (1 - forget)`` recent steps. A small ridge, relative to the data, keeps the
    solve defined before every direction has been seen.
    """

    forget: float = 0.995
    ridge: float = 1e-6
    samples: int = 0

    def __post_init__(self) -> None:
        self.gram = torch.zeros(NUM_FEATURES, NUM_FEATURES, dtype=torch.float64)
        self.moment = torch.zeros(NUM_FEATURES, dtype=torch.float64)
        self.fastest = float("inf")

    def observe(self, rows: int, positions: int, steps: int, seconds: float) -> None:
        x = step_features(rows, positions, steps)
        self.gram.mul_(self.forget).add_(torch.outer(x, x))
        self.moment.mul_(self.forget).add_(x, alpha=seconds)
        self.fastest = min(self.fastest, seconds)
        self.samples += 1

    def fit(self) -> CostFit:
        scale = self.ridge * float(self.gram.diagonal().mean())
        theta = torch.linalg.solve(self.gram + scale * torch.eye(NUM_FEATURES, dtype=torch.float64), self.moment)
        return CostFit(theta, self.fastest)


@dataclass(frozen=True)
class DraftPlan:
    steps: int  # S: draft steps to run now (0: a plain step)
    counts: Tensor  # [B] int64 in 0..S: drafts each row verifies next step
    tau: float  # the chance a verified position must have, at this plan's cost (for confidence-based counts)
    tokens_per_second: float  # expected, at this plan


def plan_drafts(survival: Tensor, cost: CostFit) -> DraftPlan:
    """The plan with the most expected tokens per second. survival: [B, K] host float, non-increasing along K."""
    rows, max_steps = survival.shape
    s = survival.double()
    best: DraftPlan | None = None
    for steps in range(max_steps + 1):
        values, order = torch.sort(s[:, :steps].reshape(-1), descending=True, stable=True)
        gained = torch.cat([values.new_zeros(1), values.cumsum(0)])  # [m + 1]: taking the m best positions
        m = torch.arange(gained.numel(), dtype=torch.float64)
        rate = (rows + gained) / cost.seconds(rows, rows + m, steps)
        if steps > 0:
            rate[0] = -1.0  # drafting and verifying none is never better than the plain step, which S = 0 covers
        taken = int(rate.argmax())
        if best is None or rate[taken] > best.tokens_per_second:
            counts = torch.zeros(rows * max(steps, 1), dtype=torch.int64)
            counts[order[:taken]] = 1
            counts = counts.view(rows, -1).sum(dim=1) if steps else counts[:rows]
            best = DraftPlan(steps, counts, float(rate[taken] * cost.theta[2].clamp(min=0.0)), float(rate[taken]))
    assert best is not None
    return best


def exploring(plan: DraftPlan, max_steps: int) -> DraftPlan:
    """A neighbouring plan, run now and then so the fit sees the steps it would otherwise never take: one draft
    step fewer (every row capped at it), or, from a plain step, one draft for every row."""
    if plan.steps == 0:
        return DraftPlan(1, torch.ones_like(plan.counts), 0.0, plan.tokens_per_second) if max_steps else plan
    steps = plan.steps - 1
    return DraftPlan(steps, plan.counts.clamp(max=steps), plan.tau, plan.tokens_per_second)
