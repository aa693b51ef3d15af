"""Adaptive draft length: how many of its K drafts each row sends to verification.

The rule, deterministic and per row:

1. The assistant's top-1 probability at draft step l, ``c_l``, scaled by the row's calibration for that step
   ``r_l`` and capped at 1, is the chance that draft l is right given the ones before it:
   ``q_l = min(1, r_l * c_l)``. A small assistant is under-confident, and more so at later steps (on the fixture
   its mean top-1 probability falls from 0.6 to 0.03 over three steps while the target accepts 82 %, then 78 %,
   then 91 % of the drafts that reach it), so ``r`` is learnt per request and step from the request's own
   accept/reject outcomes (``Calibration``, on the host, a batch of rows at a time), starting from an engine-wide
   estimate.
2. ``s_j = q_1 * ... * q_j`` is then the chance that verifying position j adds a token.
3. A position is worth verifying when ``s_j`` reaches the step's threshold ``tau``, which the cost model sets
   (``ops/cost.py``): the tokens per second of the step's plan times what one more verified position costs. At
   batch 1 a verified position costs little next to the step's fixed cost, so nearly every draft goes; where
   each position costs real target compute, only likely ones go.
4. A row verifies the longest prefix of positions that pass: ``k = #{j : s_j >= tau}`` (``s`` only falls).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import Tensor

CALIBRATION_RANGE = (0.25, 64.0)
PRIOR_CONFIDENCE = 0.1


def draft_chances(confidence: Tensor, calibration: Tensor) -> Tensor:
    """[B, K] ``q_l``. confidence[B, K], calibration[B, K] > 0."""
    return (confidence.float() * calibration[:, : confidence.shape[1]]).clamp(max=1.0)


def draft_survival(chances: Tensor) -> Tensor:
    """[B, K] ``s_j``: the chance that drafts 1..j are all accepted."""
    return chances.cumprod(dim=1)


def choose_num_drafts(survival: Tensor, tau: float) -> Tensor:
    """[B] int64 in 0..K: drafts to verify per row."""
    return (survival >= tau).sum(dim=1)


@dataclass(frozen=True)
class Calibration:
    """``r_l`` for one draft step, as exponentially weighted sums of outcomes and of the assistant's confidences;
    floats, or numpy arrays of them (one per request and draft step) updated together.

    ``r = accepted / confidence`` makes ``q = r * c`` match the acceptance rate on average: fed drafts accepted at
    rate a with confidence c, it settles at r = a / c, so q = a. (A geometric move toward outcome / q with
    outcomes clipped settles at q = 4^-((1 - a) / a) instead: 0.25 for a = 0.5.) It starts as ``prior`` weighted
    like one confidence of ``PRIOR_CONFIDENCE``, which the first outcomes wash out.
    """

    accepted: float | np.ndarray
    confidence: float | np.ndarray

    @classmethod
    def start(cls, prior: float) -> Calibration:
        return cls(prior * PRIOR_CONFIDENCE, PRIOR_CONFIDENCE)

    @property
    def ratio(self) -> float | np.ndarray:
        return np.clip(np.divide(self.accepted, self.confidence), *CALIBRATION_RANGE)

    def update(self, confidence: float | np.ndarray, accepted: bool | np.ndarray, weight: float = 0.2,
               where: bool | np.ndarray = True) -> Calibration:
        """After a verified draft the assistant gave ``confidence`` (c_l, uncalibrated) was accepted or not; only
        where ``where`` holds."""
        return Calibration(
            np.where(where, (1 - weight) * self.accepted + weight * np.asarray(accepted, np.float64), self.accepted),
            np.where(where, (1 - weight) * self.confidence + weight * np.asarray(confidence), self.confidence))


def moving_average_in_order(value: np.ndarray, samples: np.ndarray, where: np.ndarray, weight: float) -> np.ndarray:
    """value[K] after each column's samples[B, K] where where[B, K], taken row by row in order, each moving it by
    ``weight`` (x <- x + weight (sample - x)): the numbers of B sequential updates, without a loop over rows."""
    mask = where.astype(np.float64)
    later = mask[::-1].cumsum(axis=0)[::-1] - mask  # the masked rows after each one, per column
    keep = 1.0 - weight
    return keep ** mask.sum(axis=0) * value + (weight * keep**later * mask * samples).sum(axis=0)
