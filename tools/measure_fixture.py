"""Measure the bundled pair through vLLM and write its MODEL_CARD.md.

    python tools/measure_fixture.py            # about 3 minutes on 2 cores

Acceptance is measured with vLLM's own Gemma 4 MTP path (plugins off), K=3, greedy, on the
32 held-out prompts, and compared with plain decoding in the same run.
"""

from __future__ import annotations

import itertools
import json
import sys

from vllm_mtp_gemma4.bench import FIXTURE_DIR
from vllm_mtp_gemma4.bench.job import Job, run_job

MAX_TOKENS = 64


def measure() -> dict:
    prompts = json.loads((FIXTURE_DIR / "held_out_prompts.json").read_text())
    engine = {"model": str(FIXTURE_DIR / "target"), "dtype": "float32", "enforce_eager": True,
              "max_model_len": 2048}
    sampling = {"temperature": 0.0, "max_tokens": MAX_TOKENS}
    plain = run_job(Job(engine=engine, prompts=prompts, sampling=sampling))
    result = {"prompts": len(prompts), "max_tokens": MAX_TOKENS, "k": 3, "upstream_mtp": {}, "plugin_mtp": {}}
    for (key, plugins), name in itertools.product((("upstream_mtp", False), ("plugin_mtp", True)),
                                                  ("assistant", "assistant-centroids")):
        spec = {"method": "mtp", "model": str(FIXTURE_DIR / name), "num_speculative_tokens": 3}
        try:
            run = run_job(Job(engine={**engine, "speculative_config": spec}, prompts=prompts,
                              sampling=sampling, plugins=plugins))
        except RuntimeError as e:
            result[key][name] = {"error": str(e).splitlines()[0].split(": ", 1)[1]}
            continue
        result[key][name] = {
            "mean_acceptance_length": round(run.spec.mean_acceptance_length, 3),
            "acceptance_per_position": [round(a, 3) for a in run.spec.acceptance_rate_per_pos],
            "greedy_identical_to_plain": sum(a == b for a, b in zip(run.token_ids, plain.token_ids)),
        }
    return result


def model_card(training: dict, corpus: dict, acceptance: dict) -> str:
    plain = acceptance["upstream_mtp"]["assistant"]

    def line(run: dict) -> str:
        if "error" in run:
            return f"fails to start: `{run['error']}`"
        return (f"mean acceptance length **{run['mean_acceptance_length']}**, per position "
                f"{run['acceptance_per_position']}, greedy identical to plain for {run['greedy_identical_to_plain']}")
    return f"""# gemma4-tiny: a trained tiny Gemma 4 target and MTP assistants

Test and benchmark fixture for vllm-mtp-gemma4. Made by `python tools/train_fixture.py`
(deterministic, seed {training['seed']}, {training['wall_seconds'] // 60} minutes on 2 CPU cores);
measured by `python tools/measure_fixture.py`. Weights are stored in bf16 and computed in fp32.

| | target (`target/`) | assistant (`assistant/`, `assistant-centroids/`) |
|---|---|---|
| architecture | `Gemma4ForCausalLM` | `Gemma4AssistantForCausalLM` |
| layers | 8: 3 sliding + 1 full, twice; last 2 KV-shared | 2: sliding + full, Q-only into the target's KV |
| hidden | 192, head dim 48 (sliding) / 96 (full), 4 q / 2 kv heads | 128, `backbone_hidden_size` 192 |
| other | per-layer inputs (16), sliding window 128, logit soft-cap 30 | centroids variant: 64 centroids, top 8 |

## Corpus
Top-level `*.py` modules of the CPython {corpus['python']} standard library: {len(corpus['train'])} files for
training, {len(corpus['held_out'])} held out ({', '.join(corpus['held_out'])}). `corpus.json` lists every file
with its SHA-256. Besides plain files, {corpus['chat_documents']} chat documents built from documented
functions teach the chat template and a thinking block:
`<|turn>user\\nWrite `def f(...)` from mod.<turn|>\\n<|turn>model\\n`
`<|channel>thought\\n<docstring><channel|><code><turn|>`.
Tokens: {corpus['train_tokens']:,} train, {corpus['held_out_tokens']:,} held out.

## Tokenizer
Byte-level BPE (Hugging Face `tokenizers`), 4,096 tokens, with Gemma 4's special tokens (`<pad>`=0,
`<eos>`=1, `<bos>`=2, `<|turn>`, `<turn|>`, `<|channel>`, `<channel|>`, tool tokens). The chat template
opens a thinking block with `enable_thinking=True`. `<eos>` and `<turn|>` end generation.

## Training
- Target: {training['target_steps']} steps of {training['batch']}x{training['seq_len']} tokens, AdamW 3e-3, cosine.
- Assistant: {training['assistant_steps']} steps, target frozen,
  {training['draft_steps_unrolled']} draft steps unrolled, each fed the true next token and the previous step's
  projected state at the held position; loss is the KL divergence to the target's next-token distribution.
  Causal mask: the query for h_t sees target K/V <= t.
- Centroid variant: the assistant above, its output embeddings clustered by balanced k-means (64 groups of 64),
  and its centroid head trained {training['centroid_steps']} steps on the target's probability mass per group.

## Measured
- Held-out perplexity of the target: **{training['held_out_perplexity']}**.
- Teacher-forced top-1 agreement with the target per draft step (held out):
  assistant {training['teacher_forced_top1_agreement']['assistant']},
  centroids {training['teacher_forced_top1_agreement']['assistant-centroids']}.
- vLLM 0.32 upstream MTP (plugins off), K={acceptance['k']}, greedy, {acceptance['prompts']} held-out prompts,
  {acceptance['max_tokens']} tokens each:
  - plain assistant: mean acceptance length **{plain['mean_acceptance_length']}**, per-position acceptance
    {plain['acceptance_per_position']}; greedy output identical to plain decoding for
    {plain['greedy_identical_to_plain']} of {acceptance['prompts']} prompts;
  - centroid assistant: {line(acceptance["upstream_mtp"]["assistant-centroids"])}.
- The same through the plugin's proposer (vllm-mtp-gemma4), which runs the centroid head on CPU:
  - plain assistant: {line(acceptance["plugin_mtp"]["assistant"])};
  - centroid assistant: {line(acceptance["plugin_mtp"]["assistant-centroids"])}.
"""


def main() -> None:
    acceptance = measure()
    (FIXTURE_DIR / "acceptance.json").write_text(json.dumps(acceptance, indent=2) + "\n")
    training = json.loads((FIXTURE_DIR / "training.json").read_text())
    corpus = json.loads((FIXTURE_DIR / "corpus.json").read_text())
    (FIXTURE_DIR / "MODEL_CARD.md").write_text(model_card(training, corpus, acceptance))
    json.dump(acceptance, sys.stdout, indent=2)


if __name__ == "__main__":
    main()
