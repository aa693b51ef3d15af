"""What adaptive K plans against what it then measures, step by step, at batch 1, 8 and 32 (issue 25 point 1).

    python benchmarks/adaptive_trace.py [--eager] [--sampled]   # summary; the whole trace: /tmp/adaptive_trace.json

One engine (the fixture pair, K=3, ``adaptive_k``, compiled; ``--eager`` for eager) in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``), its runner's ``_plan``, ``StepTimes.observe`` and ``_read_step`` wrapped to
record, per step: the batch size, the S planned, whether it was an exploration, the step seconds the plan used for
each S, the tokens per second it predicted for each S, the drafts each row was then sent and the tokens the step
committed; and each step-time measurement taken (batch, S, seconds). Greedy (``--sampled``: T=0.8),
``ignore_eos``; batch 1 runs a short pass (48 tokens a request) and a long one (256), batch 8 a long one, batch 32
both.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

FIXTURE = Path("fixtures/gemma4-tiny")
OUT = Path("/tmp")  # the trace is about 0.6 MB; the finding is benchmarks/results/adaptive/diagnosis.md
PASSES = [(1, 48), (1, 256), (8, 256), (32, 48), (32, 256)]  # (batch, max_tokens)
EAGER = "--eager" in sys.argv  # compiled by default, as served
TEMPERATURE = 0.8 if "--sampled" in sys.argv else 0.0


def main() -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM, SamplingParams

    from vllm_mtp_gemma4.ops import cost
    from vllm_mtp_gemma4.worker.v1 import runner as fused

    trace: dict[str, list] = {"plans": [], "measured": [], "steps": []}
    plan, observe, read = fused.FusedStepMixin._plan, cost.StepTimes.observe, fused.FusedStepMixin._read_step

    def traced_plan(self, req_ids):
        exploring = self.planner._exploring is not None
        result = plan(self, req_ids)
        sampled = not self.input_batch.sampling_metadata.all_greedy
        times = self.times_in_use[int(sampled), cost.batch_bucket(len(req_ids))]
        survival = self.tracker.survival(req_ids)
        k = self.num_spec_tokens
        predicted = ([] if times[: k + 1].isnan().any()
                     else cost.expected_rates(survival, times[: k + 1].tolist()))
        trace["plans"].append({"rows": len(req_ids), "steps": result.steps, "exploring": exploring
                               or self.planner._exploring is not None, "times": times.tolist(),
                               "predicted_tokens_per_s": predicted, "counts": result.counts.tolist(),
                               "survival_mean": survival.mean(axis=0).tolist()})
        return result

    def traced_observe(self, sampled, rows, steps, seconds):
        trace["measured"].append({"rows": rows, "steps": steps, "seconds": seconds, "sampled": sampled})
        return observe(self, sampled, rows, steps, seconds)

    def traced_read(self, sampled, drafts, choice):
        out = read(self, sampled, drafts, choice)
        host = out[0]
        trace["steps"].append({"rows": int(host.shape[0]), "committed": int((host != -1).sum()),
                               "verified_drafts": [len(d) for d in self.input_batch.spec_token_ids[:host.shape[0]]],
                               "time": time.perf_counter()})
        return out

    fused.FusedStepMixin._plan, cost.StepTimes.observe = traced_plan, traced_observe
    fused.FusedStepMixin._read_step = traced_read
    prompts = json.loads((FIXTURE / "held_out_prompts.json").read_text())
    spec = {"method": "mtp", "model": str(FIXTURE / "assistant"), "num_speculative_tokens": 3,
            "vllm_mtp_gemma4": {"adaptive_k": True}}
    llm = LLM(model=str(FIXTURE / "target"), dtype="float32", enforce_eager=EAGER, max_model_len=2048,
              gpu_memory_utilization=0.2, seed=0, speculative_config=spec, max_num_seqs=32)
    passes = []
    for batch, max_tokens in PASSES:
        marks = {k: len(v) for k, v in trace.items()}
        begin = time.perf_counter()
        params = SamplingParams(temperature=TEMPERATURE, max_tokens=max_tokens, ignore_eos=True)
        groups = [[p] for p in prompts[:8]] if batch == 1 else [prompts[:batch]]  # batch 1: one at a time
        outputs = [o for group in groups for o in llm.generate(group, params, use_tqdm=False)]
        seconds = time.perf_counter() - begin
        passes.append({"batch": batch, "max_tokens": max_tokens, "seconds": seconds,
                       "tokens": sum(len(o.outputs[0].token_ids) for o in outputs), "marks": marks})
    trace["passes"] = passes
    (OUT / "adaptive_trace.json").write_text(json.dumps(trace))
    summarize(trace)


def summarize(trace: dict) -> None:
    ends = [p["marks"] for p in trace["passes"][1:]] + [{k: len(v) for k, v in trace.items() if k != "passes"}]
    for p, end in zip(trace["passes"], ends):
        plans = trace["plans"][p["marks"]["plans"]:end["plans"]]
        measured = trace["measured"][p["marks"]["measured"]:end["measured"]]
        steps = trace["steps"][p["marks"]["steps"]:end["steps"]]
        full = [pl for pl in plans if pl["rows"] == p["batch"]]
        chosen = Counter(pl["steps"] for pl in full)
        by_s = defaultdict(list)
        for m in measured:
            if m["rows"] == p["batch"]:
                by_s[m["steps"]].append(m["seconds"])
        print(f"\nbatch {p['batch']}, {p['max_tokens']} tokens: {p['tokens'] / p['seconds']:.0f} tok/s, "
              f"{len(steps)} steps, {len(plans)} plans ({len(full)} at full batch), "
              f"S chosen {dict(sorted(chosen.items()))}")
        print("  measured step ms by S (count, median):",
              {s: (len(v), round(statistics.median(v) * 1e3, 2)) for s, v in sorted(by_s.items())})
        if full:
            last = full[-1]
            print("  last full-batch plan: times ms", [round(t * 1e3, 2) for t in last["times"]],
                  "predicted tok/s", [round(r) for r in last["predicted_tokens_per_s"]],
                  "survival", [round(s, 2) for s in last["survival_mean"]], "counts mean",
                  round(sum(last["counts"]) / len(last["counts"]), 2))
        drafted = [s for s in steps if s["rows"] == p["batch"] and any(s["verified_drafts"])]
        if drafted:
            sent = statistics.mean(sum(s["verified_drafts"]) / s["rows"] for s in drafted)
            got = statistics.mean((s["committed"] - s["rows"]) / s["rows"] for s in drafted)
            print(f"  drafting steps at full batch: {len(drafted)}, drafts verified per row {sent:.2f}, "
                  f"accepted per row {got:.2f}")


if __name__ == "__main__":
    if "--summary" in sys.argv:
        summarize(json.loads((OUT / "adaptive_trace.json").read_text()))
    else:
        main()
