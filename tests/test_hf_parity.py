"""vLLM's greedy text for the fixture target equals Hugging Face transformers' (both fp32)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, Gemma4ForCausalLM

from .conftest import GREEDY_TOKENS, TARGET

pytestmark = pytest.mark.engine
NEAR_TIE = 1e-3


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    model = Gemma4ForCausalLM.from_pretrained(TARGET, dtype=torch.float32, attn_implementation="eager")
    return model.eval(), AutoTokenizer.from_pretrained(TARGET)


def hf_greedy(model, tok, prompt: str) -> list[int]:
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=GREEDY_TOKENS, do_sample=False, top_k=None, top_p=None)
    return out[0, ids.shape[1]:].tolist()


def top2_gap(model, tok, prompt: str, continuation: list[int]) -> float:
    ids = torch.tensor([tok(prompt).input_ids + continuation])
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    top = torch.topk(logits, 2).values
    return float(top[0] - top[1])


def test_vllm_greedy_matches_transformers(hf_model, held_out_prompts, plain_greedy):
    model, tok = hf_model
    identical, diverged = 0, []
    for prompt, vllm_ids in zip(held_out_prompts, plain_greedy.token_ids):
        hf_ids = hf_greedy(model, tok, prompt)
        if hf_ids == vllm_ids:
            identical += 1
            continue
        at = next((i for i, (a, b) in enumerate(zip(hf_ids, vllm_ids)) if a != b), min(len(hf_ids), len(vllm_ids)))
        diverged.append((at, top2_gap(model, tok, prompt, hf_ids[:at])))
    assert identical >= 30, f"only {identical}/32 identical; divergences (position, top-2 gap): {diverged}"
    assert all(gap < NEAR_TIE for _, gap in diverged), f"divergence away from a near-tie: {diverged}"
