"""Relaxed acceptance on Model Runner V2: per-step cost against context length, and the memory one step takes.

    python benchmarks/v2_relaxed.py      # about 3 minutes on 2 CPU cores; writes benchmarks/results/v2_relaxed/

The plugin's V2 logits processor (``worker/v2/relaxed.py``), built as V2 builds it: a ``VllmConfig`` for the
fixture with relaxed acceptance on, and V2's own ``RequestState`` buffers (committed tokens, lengths). B requests,
all sampled (relaxed by the config), each with a thinking block opened near the start of its context, K drafts per
step. Each timed step is what V2 calls per step: ``apply_staged_writes`` then ``apply`` on B x (K + 1) logits rows;
between steps every request commits K + 1 tokens (all drafts accepted: the most a step can commit). Reported:
- median ms per step at contexts of 1k, 8k and 32k tokens, at the fixture's vocabulary (4,096, where history work
  would show) and at Gemma 4's (262,144); the goal is 32k / 1k <= 1.1;
- the one-off admission (the context's thinking state, read once per request);
- for comparison, the history scan alone that the processor ran every step until commit 6a1f614;
- the resident memory one step adds at B = 256, K = 4, V = 262,144 (peak RSS during ``apply`` less before it,
  in a fresh process), against the bound ``ops.relaxed.CHUNK_BYTES`` sets.
"""

from __future__ import annotations

import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "benchmarks" / "results" / "v2_relaxed"
TARGET, ASSISTANT = REPO / "fixtures/gemma4-tiny/target", REPO / "fixtures/gemma4-tiny/assistant"


def build(batch: int, k: int, context: int):
    """The processor and V2's request state, B requests admitted with ``context`` committed tokens each."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.sampling_params import SamplingParams
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcRequestState
    from vllm.v1.worker.gpu.states import RequestState

    from vllm_mtp_gemma4.worker.v2.relaxed import RelaxedAcceptanceProcessor

    config = EngineArgs(model=str(TARGET), max_model_len=2048, speculative_config={
        "method": "mtp", "model": str(ASSISTANT), "num_speculative_tokens": k,
        "vllm_mtp_gemma4": {"relaxed_acceptance": True}}).create_engine_config()
    states = RequestState(batch, context + 64 * (k + 1), 8192, k, 4096, torch.device("cpu"))
    processor = RelaxedAcceptanceProcessor(config, LogitsProcRequestState.from_request_state(states))
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(100, 4000, (batch, context), generator=gen, dtype=torch.int32)
    tokens[:, 10] = processor.open_id  # a thinking block open from near the start
    states.all_token_ids.gpu[:, :context] = tokens
    states.total_len.gpu[:] = context
    states.prefill_len.np[:] = context
    for slot in range(batch):
        processor.add_request(slot, SamplingParams(temperature=0.8))
    return processor, states


def context_of_step(batch: int, k: int, step: int, context: int):
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext

    rows = batch * (k + 1)
    gen = torch.Generator().manual_seed(step)
    idx = torch.arange(batch, dtype=torch.int32)
    local = torch.arange(k + 1, dtype=torch.int32).repeat(batch)
    return LogitsContext(expanded_idx_mapping=idx.repeat_interleave(k + 1), idx_mapping=idx,
                         idx_mapping_np=idx.numpy(), expanded_local_pos=local,
                         input_ids=torch.randint(100, 4000, (rows,), generator=gen, dtype=torch.int32),
                         pos=context - 1 + local.long(), seq_lens_upper_bound_np=np.full(batch, context + k))


def step_times(batch: int, k: int, vocab: int, context: int, steps: int) -> dict:
    processor, states = build(batch, k, context)
    start = time.perf_counter()
    processor.apply_staged_writes()  # admission: each request's state from its context, once
    admission_ms = (time.perf_counter() - start) * 1e3
    logits = torch.randn(batch * (k + 1), vocab, generator=torch.Generator().manual_seed(1)) * 3
    times = []
    for step in range(steps):
        ctx = context_of_step(batch, k, step, context + step * (k + 1))
        work = logits.clone()
        begin = time.perf_counter()
        processor.apply_staged_writes()
        processor.apply(work, ctx)
        times.append((time.perf_counter() - begin) * 1e3)
        # The step commits its K + 1 tokens.
        length = context + (step + 1) * (k + 1)
        states.all_token_ids.gpu[:, length - (k + 1):length] = ctx.input_ids.view(batch, k + 1)
        states.total_len.gpu[:] = length
    forced = int((work != logits).any(1).sum())
    return {"batch": batch, "k": k, "vocab": vocab, "context": context, "steps": steps,
            "median_ms": round(statistics.median(times[2:]), 3), "admission_ms": round(admission_ms, 3),
            "history_scan_ms": history_scan_ms(states, ctx), "rows_forced_last_step": forced}


def history_scan_ms(states, ctx) -> float:
    """The thinking state as the processor found it until commit 6a1f614, for comparison in the same run: every
    logits row's whole committed history gathered and scanned, every step."""
    from vllm_mtp_gemma4.ops import thinking_at_lengths

    slot, committed = ctx.expanded_idx_mapping.long(), ctx.pos.long() - ctx.expanded_local_pos.long()
    width = int(ctx.seq_lens_upper_bound_np.max())
    times = []
    for _ in range(5):
        begin = time.perf_counter()
        thinking_at_lengths(states.all_token_ids.gpu[slot, :width], committed, 7, 8)
        times.append((time.perf_counter() - begin) * 1e3)
    return round(statistics.median(times), 3)


def memory_child(batch: int, k: int, vocab: int) -> None:
    """Run in a fresh process: peak resident memory that one ``apply`` adds."""
    torch.set_num_threads(1)
    processor, _ = build(batch, k, 1024)
    processor.apply_staged_writes()
    logits = torch.empty(batch * (k + 1), vocab).normal_().mul_(3)  # in place: no temporary raises the peak
    ctx = context_of_step(batch, k, 0, 1024)
    work = logits.clone()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    processor.apply(work, ctx)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"extra_bytes": after - before, "rows_forced": int((work != logits).any(1).sum())}))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--memory-child":
        memory_child(*map(int, sys.argv[2:5]))
        return
    torch.set_num_threads(1)  # one thread: steadier on a shared machine, and no OpenMP spinning against others
    rows = []
    for vocab in (4096, 262_144):
        for context in (1024, 8192, 32768):
            rows.append(step_times(32, 3, vocab, context, steps=12))
            print(json.dumps(rows[-1]), flush=True)
    from vllm_mtp_gemma4.ops.relaxed import CHUNK_BYTES, COUNT_COLUMNS, row_chunk

    batch, k, vocab = 256, 4, 262_144
    child = subprocess.run([sys.executable, __file__, "--memory-child", str(batch), str(k), str(vocab)],
                           capture_output=True, text=True, check=True)
    memory = json.loads(child.stdout.strip().splitlines()[-1])
    # A chunk's gathered rows and its exp (float32 each), and one slice of the rank count (bool + int64).
    bound = row_chunk(vocab) * (8 * vocab + 9 * COUNT_COLUMNS)
    memory.update({"batch": batch, "k": k, "vocab": vocab, "rows_per_chunk": row_chunk(vocab),
                   "chunk_bytes": CHUNK_BYTES, "bound_bytes": bound,
                   "one_vllm_verification_chunk_bytes": (1 << 30)})
    print(json.dumps(memory), flush=True)
    ratios = {str(v): round(next(r["median_ms"] for r in rows if r["vocab"] == v and r["context"] == 32768)
                            / next(r["median_ms"] for r in rows if r["vocab"] == v and r["context"] == 1024), 3)
              for v in (4096, 262_144)}
    OUT.mkdir(parents=True, exist_ok=True)
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.machine(),
              "cpus": torch.get_num_threads(), "torch": torch.__version__, "rows": rows,
              "ratio_32k_over_1k": ratios, "memory": memory, "command": "python benchmarks/v2_relaxed.py"}
    (OUT / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(rows)
    lines = ["# Relaxed acceptance on Model Runner V2: cost per step against context", "",
             f"`python benchmarks/v2_relaxed.py`, {result['date']}, CPU ({torch.get_num_threads()} threads), "
             "B = 32, K = 3, every request relaxed and inside a thinking block.", "",
             "| vocabulary | context | ms per step (median) | admission, once (ms) | before: history scan alone, per "
             "step (ms) |", "|---|---|---|---|---|"]
    lines += [f"| {r['vocab']:,} | {r['context']:,} | {r['median_ms']} | {r['admission_ms']} | {r['history_scan_ms']} |"
              for r in rows]
    lines += ["", f"32k ÷ 1k: {ratios['4096']} at V = 4,096, {ratios['262144']} at V = 262,144 (goal <= 1.1).", "",
              f"Memory one step adds at B = {batch}, K = {k}, V = {vocab:,} ({batch * (k + 1)} rows): "
              f"{memory['extra_bytes'] / 2**20:.0f} MiB peak RSS, against a bound of {bound / 2**20:.0f} MiB "
              f"({row_chunk(vocab)} rows per chunk) and vLLM's own 1 GiB verification chunk."]
    (OUT / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vocabs = sorted({r["vocab"] for r in rows})
    fig, axes = plt.subplots(1, len(vocabs), figsize=(5 * len(vocabs), 4))
    for ax, vocab in zip(axes, vocabs):
        mine = [r for r in rows if r["vocab"] == vocab]
        contexts = [r["context"] for r in mine]
        ax.plot(contexts, [r["median_ms"] for r in mine], marker="o", label="whole step, now")
        ax.plot(contexts, [r["history_scan_ms"] for r in mine], marker="s", linestyle="--",
                label="history scan alone, before (6a1f614)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("ms per step (B = 32, K = 3)")
        ax.set_title(f"V = {vocab:,}")
        ax.set_ylim(bottom=0)
        ax.legend()
    fig.suptitle("V2 relaxed acceptance: per-step cost against context (CPU, 1 thread)")
    fig.tight_layout()
    fig.savefig(OUT / "step_cost.png", dpi=120)


if __name__ == "__main__":
    main()
