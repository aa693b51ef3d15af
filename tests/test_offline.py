"""Offline batches: ``LLM.generate`` on 1,000 prompts in one call, with vLLM's progress bar, speculating."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from vllm_mtp_gemma4.bench.job import Job, run_job

from .conftest import ENGINE, TARGET, mtp_config

pytestmark = pytest.mark.engine
COUNT = 1000
SAMPLING = {"temperature": 0.0, "max_tokens": 12}


def thousand_prompts(held_out_prompts: list[str]) -> list[list[int]]:
    """1,000 distinct prompts of 4 to 67 tokens, cut from the held-out code."""
    tok = AutoTokenizer.from_pretrained(TARGET)
    stream = tok("".join(held_out_prompts), add_special_tokens=False).input_ids
    return [[tok.bos_token_id, *stream[(7 * i) % (len(stream) - 80):][: 3 + i % 64]] for i in range(COUNT)]


def test_thousand_prompts_in_one_call(held_out_prompts, record_property):
    prompts = thousand_prompts(held_out_prompts)
    engine = {**ENGINE, "max_num_seqs": 256}
    plain = run_job(Job(engine=engine, prompts=prompts, sampling=SAMPLING))
    spec = run_job(Job(engine={**engine, "speculative_config": {**mtp_config(3), "vllm_mtp_gemma4": {}}},
                       prompts=prompts, sampling=SAMPLING, progress=True))
    assert len(spec.token_ids) == COUNT and all(r in ("length", "stop") for r in spec.finish_reasons)
    assert "Processed prompts: 100%" in spec.log  # vLLM's progress bar ran to the end
    assert spec.token_ids == plain.token_ids
    throughput = {name: round(r.generated_tokens / sum(r.seconds), 1) for name, r in (("plain", plain),
                                                                                      ("plugin", spec))}
    print(f"\n1,000 prompts, greedy, tokens/s: {throughput}")
    record_property("tokens_per_s", throughput)
