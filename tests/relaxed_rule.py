"""The relaxed-acceptance rule checked on committed tokens against the target's own raw log-probabilities, for
both runners' end-to-end tests."""

from __future__ import annotations

import json
import math

from transformers import AutoTokenizer

from vllm_mtp_gemma4.bench.job import Job, JobResult, run_job
from vllm_mtp_gemma4.config import THINKING_CLOSE, THINKING_OPEN
from vllm_mtp_gemma4.ops import thinking_after

from .conftest import ENGINE, TARGET

TOP_LOGPROBS = 20


def score(prompts: list[list[int]], outputs: list[list[int]]) -> JobResult:
    """Plain decoding's top-20 raw log-probabilities at every position of prompt + output."""
    return run_job(Job(engine=ENGINE, prompts=[p + o for p, o in zip(prompts, outputs)],
                       sampling={"temperature": 0.0, "max_tokens": 1, "prompt_logprobs": TOP_LOGPROBS}))


def assert_tokens_obey_the_rule(prompts: list[list[int]], outputs: list[list[int]], scored: JobResult, topk: int,
                                delta: float) -> int:
    """Inside thinking each committed token is among the target's top N with p >= p_top1 - delta, the closing
    marker and EOS only as the argmax; outside thinking each is the argmax. Returns how many tokens only the relaxed
    rule allows (the caller asserts it is > 0: the rule was exercised)."""
    tok = AutoTokenizer.from_pretrained(TARGET)
    open_id, close_id = tok.convert_tokens_to_ids(THINKING_OPEN), tok.convert_tokens_to_ids(THINKING_CLOSE)
    strict_ids = {close_id, tok.eos_token_id, *json.loads((TARGET / "config.json").read_text())["eos_token_id"]}
    relaxed_only = 0
    for prompt, output, logprobs in zip(prompts, outputs, scored.prompt_logprobs):
        sequence = prompt + output
        for i in range(len(prompt), len(sequence)):
            token, top = sequence[i], logprobs[i]
            best = max(top.values())
            is_argmax = top.get(token) == best
            if thinking_after(False, sequence[:i], open_id, close_id) and token not in strict_ids:
                assert token in top, (i, token)
                rank = sum(lp > top[token] + 1e-6 for lp in top.values())
                assert rank < topk and math.exp(top[token]) >= math.exp(best) - delta - 1e-4, (i, token)
                relaxed_only += not is_argmax
            else:
                assert is_argmax, (i, token, top.get(token), best)
    return relaxed_only
