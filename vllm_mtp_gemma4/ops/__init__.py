"""Pure tensor functions of the speculative step: verification (greedy, lossless sampled, relaxed), counter-based
noise and the processed distribution, thinking state, the vocab-parallel argmax, adaptive draft counts and the
step cost model.

Nothing here imports vLLM, so every op runs and is tested alone, on CPU or GPU.
"""

from .adaptive import Calibration, choose_num_drafts, draft_chances, draft_survival, moving_average_in_order
from .cost import DraftPlan, Planner, StepTimes, batch_bucket, expected_rates, exploring, plan_drafts
from .relaxed import force_relaxed_drafts, force_tokens, relaxed_accepts, row_chunk, strict_only
from .sampling import (
    GREEDY_TEMPERATURE,
    SamplingTensors,
    add_logit_bias,
    draw_tokens,
    process_logits,
    sample_from_probs,
    uniform_noise,
)
from .thinking import advance_thinking, thinking_after, thinking_at_lengths, thinking_flags, thinking_flags_ragged
from .verify import (
    PLACEHOLDER,
    SYNTHETIC_STREAM,
    RelaxedInputs,
    Synthetic,
    Verdict,
    Verification,
    accepted_rows,
    greedy_verdict,
    head_indices,
    next_tokens,
    relaxed_verdict,
    resolve,
    sampled_verdict,
    synthetic_verdict,
    verify_greedy,
    verify_step,
)
from .vocab_parallel import reduce_top1, shard_top1

__all__ = [
    "Calibration",
    "moving_average_in_order",
    "thinking_flags_ragged",
    "advance_thinking",
    "row_chunk",
    "thinking_at_lengths",
    "strict_only",
    "relaxed_accepts",
    "force_tokens",
    "force_relaxed_drafts",
    "GREEDY_TEMPERATURE",
    "PLACEHOLDER",
    "RelaxedInputs",
    "SYNTHETIC_STREAM",
    "SamplingTensors",
    "Synthetic",
    "Verdict",
    "Verification",
    "accepted_rows",
    "add_logit_bias",
    "draw_tokens",
    "choose_num_drafts",
    "draft_chances",
    "draft_survival",
    "DraftPlan",
    "Planner",
    "StepTimes",
    "batch_bucket",
    "exploring",
    "expected_rates",
    "plan_drafts",
    "greedy_verdict",
    "head_indices",
    "next_tokens",
    "process_logits",
    "reduce_top1",
    "relaxed_verdict",
    "resolve",
    "sample_from_probs",
    "sampled_verdict",
    "shard_top1",
    "synthetic_verdict",
    "thinking_after",
    "thinking_flags",
    "uniform_noise",
    "verify_greedy",
    "verify_step",
]
