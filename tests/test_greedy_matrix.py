"""Greedy output with the plugin's proposer is token-identical to greedy output without speculation.

One workload covers the matrix in every engine run: batches of 1, 7 and 32 requests (consecutive
``generate`` calls); prompt lengths from 1 to 1500 tokens mixed in one batch; chunked prefill (a
256-token budget splits the long prompts); prefix caching (prompts sharing a 1,100-token prefix, and
the last batch repeats the first two); preemption (a KV cache too small for the 32-request batch); and
requests that end by ``max_tokens``, a stop string, EOS, and ``max_model_len`` reached mid-draft.
"""

from __future__ import annotations

import json

import pytest
from transformers import AutoConfig, AutoTokenizer

from vllm_mtp_gemma4.bench.job import Job, JobResult, run_job

from .conftest import ASSISTANT, ASSISTANT_CENTROIDS, ENGINE, TARGET, mtp_config

pytestmark = pytest.mark.engine
MAX_MODEL_LEN = 1560
BATCHES = [1, 7, 32]
MATRIX_ENGINE = {**ENGINE, "max_model_len": MAX_MODEL_LEN, "max_num_batched_tokens": 256, "max_num_seqs": 32,
                 "enable_prefix_caching": True, "enable_chunked_prefill": True}
# About 3,600 tokens of KV (the longest request needs 1,560): the 32-request batch, about 16,000 prompt
# tokens, must preempt, whatever K does to the scheduler's token budget.
SMALL_CACHE = {"num_gpu_blocks_override": 64}


# Chat turns cut just before the model closes its turn: greedy decoding ends them with <turn|>, an EOS
# token of the fixture (generation_config.json), after one and a few tokens.
EOS_PROMPTS = (
    "<|turn>user\nWrite `def as_integer_ratio(self):` from fractions.<turn|>\n<|turn>model\n<|channel>thought\n"
    "Return the integer ratio as a tuple.<channel|>def as_integer_ratio(self):\n"
    '        """Return the integer ratio as a tuple.\n\n'
    "        Return a tuple of two integers, whose ratio is equal to the\n"
    '        Fraction and with a positive denominator.\n        """\n'
    "        return (self._numerator, self._denominator)",
    "<|turn>user\nWrite `def __repr__(self):` from fractions.<turn|>\n<|turn>model\n<|channel>thought\n"
    'repr(self)<channel|>def __repr__(self):\n        """repr(self)"""\n'
    "        return '%s(%s, %s)' % (self.__class__.__name__,\n"
    "                               self._numerator, self._denominator",
)


def matrix_workload() -> tuple[list[list[int]], list[dict]]:
    tok = AutoTokenizer.from_pretrained(TARGET)
    text = "".join(json.loads((TARGET.parent / "held_out_prompts.json").read_text()))
    stream = tok(text, add_special_tokens=False).input_ids * 3  # about 8,400 tokens of held-out code
    bos = tok.bos_token_id
    lengths = [1, 1500, 3, 700, 17, 1200, 64, 9, 150, 40, 300, 5, 90, 450, 25, 2, 800, 120, 60, 33, 200, 12]
    prompts = [[bos, *stream[7 * i : 7 * i + n - 1]] for i, n in enumerate(lengths)]
    shared = [bos, *stream[3000:4100]]  # several KV blocks long: prefix hits count whole blocks
    prompts += [shared + stream[5000 + 11 * i : 5000 + 11 * i + 5 * i + 1] for i in range(6)]
    prompts += [tok(text).input_ids for text in EOS_PROMPTS]
    prompts += [[bos, *stream[6000:6000 + n]] for n in (30, 80)]
    assert len(prompts) == 32
    sampling = [{"temperature": 0.0, "max_tokens": 48} for _ in prompts]
    sampling[1]["max_tokens"] = 200  # 1500-token prompt: hits max_model_len while drafting
    for i, stop in ((3, "\n"), (9, "):"), (14, "=")):
        sampling[i]["stop"] = [stop]
    # Batches of 1, 7 and 32 requests. The first two hold the prompts that share a prefix, so the second
    # hits the prefix cache while it is still empty of anything else; the last repeats every prompt.
    order = [22] + [23, 24, 25, 26, 27, 0, 2] + list(range(32))
    return [prompts[i] for i in order], [sampling[i] for i in order]


@pytest.fixture(scope="module")
def workload():
    return matrix_workload()


@pytest.fixture(scope="module")
def plain(workload) -> JobResult:
    prompts, sampling = workload
    return run_job(Job(engine=MATRIX_ENGINE, prompts=prompts, sampling=sampling, batches=BATCHES))


def test_workload_exercises_every_ending(plain):
    reasons = set(plain.finish_reasons)
    assert {"length", "stop"} <= reasons, reasons
    eos_ids = set(AutoConfig.from_pretrained(TARGET).eos_token_id)  # <eos> and <turn|>
    assert any(r is None or r in eos_ids for r, f in zip(plain.stop_reasons, plain.finish_reasons) if f == "stop"), (
        "no EOS stop")
    assert any(isinstance(r, str) for r in plain.stop_reasons), "no stop-string stop"
    assert max(len(p) + len(o) for p, o in zip(workload_prompts(), plain.token_ids)) == MAX_MODEL_LEN


def workload_prompts() -> list[list[int]]:
    return matrix_workload()[0]


def _matrix() -> list:
    """Every K with one assistant kind by default, alternating; the other half of the K x assistant cross under
    ``-m scale`` (each run is a full engine start and workload: CI's time)."""
    cells = []
    for i, k in enumerate([1, 2, 3, 5, 8]):
        for j, (name, assistant) in enumerate((("plain", ASSISTANT), ("centroids", ASSISTANT_CENTROIDS))):
            marks = () if (i + j) % 2 == 0 else (pytest.mark.scale,)
            cells.append(pytest.param(k, assistant, id=f"{k}-{name}", marks=marks))
    return cells


@pytest.mark.parametrize(("k", "assistant"), _matrix())
def test_greedy_identical_to_plain_decoding(k, assistant, workload, plain):
    prompts, sampling = workload
    spec = run_job(Job(engine={**MATRIX_ENGINE, **SMALL_CACHE, "speculative_config": mtp_config(k, assistant)},
                       prompts=prompts, sampling=sampling, batches=BATCHES))
    mismatches = [i for i, (a, b) in enumerate(zip(spec.token_ids, plain.token_ids)) if a != b]
    assert not mismatches, f"K={k}: requests {mismatches} differ from plain decoding"
    assert spec.finish_reasons == plain.finish_reasons
    assert f"Gemma4MTPProposer drafting K={k}" in spec.log and spec.spec.num_drafts > 0
    assert spec.metrics.get("vllm:num_preemptions", 0) > 0, "the small cache did not preempt"
    assert spec.metrics.get("vllm:prefix_cache_hits", 0) > 0


def test_greedy_identical_with_adaptive_k(workload, plain):
    """Adaptive K (per-request draft counts, fewer draft steps) on the same workload: still token-identical."""
    prompts, sampling = workload
    spec_config = {**mtp_config(5), "vllm_mtp_gemma4": {"adaptive_k": True}}
    spec = run_job(Job(engine={**MATRIX_ENGINE, **SMALL_CACHE, "speculative_config": spec_config},
                       prompts=prompts, sampling=sampling, batches=BATCHES))
    assert spec.token_ids == plain.token_ids
    assert spec.finish_reasons == plain.finish_reasons
    assert "fused target-verify step on" in spec.log
    # Some steps verified fewer than 5 drafts: the counts really adapt.
    assert 0 < spec.spec.num_draft_tokens < 5 * spec.spec.num_drafts
