"""The centroid-masked draft head on CPU: the sparse argmax the plugin runs against the dense masked scatter vLLM
falls back to without CUDA graphs, at Gemma 4 assistant shapes. Both are vLLM's own ``Gemma4MTPMaskedEmbedder``
(``get_top_tokens`` and ``forward(...).argmax``), with random weights and a random token ordering.

    python benchmarks/centroid_head.py            # writes benchmarks/results/centroid_head/{results.json,summary.md}

Vocabulary 262,144, 2,048 centroids, top 32 centroids per token (Gemma4AssistantConfig's defaults: 4,096 candidate
tokens), assistant hidden sizes 256 and 512, 1 to 64 rows (batch x 1 draft position).
"""

from __future__ import annotations

import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from vllm.model_executor.models.gemma4_mtp import Gemma4MTPMaskedEmbedder

VOCAB, CENTROIDS, TOP_K = 262_144, 2_048, 32
OUT = Path("benchmarks/results/centroid_head")


def median_ms(fn, repeats: int = 15) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def main() -> None:
    torch.manual_seed(0)
    rows = []
    for hidden in (256, 512):
        head = Gemma4MTPMaskedEmbedder(hidden, VOCAB, CENTROIDS, TOP_K).eval()
        head.token_ordering.copy_(torch.randperm(VOCAB))
        lm_head = torch.randn(VOCAB, hidden) / hidden**0.5
        for tokens in (1, 8, 64):
            x = torch.randn(tokens, hidden)
            with torch.inference_mode():
                sparse, dense = head.get_top_tokens(x, lm_head), head(x, lm_head).argmax(-1)
                row = {"hidden": hidden, "rows": tokens, "identical_tokens": bool(torch.equal(sparse, dense)),
                       "sparse_ms": median_ms(lambda h=head, x=x, w=lm_head: h.get_top_tokens(x, w)),
                       "dense_ms": median_ms(lambda h=head, x=x, w=lm_head: h(x, w).argmax(-1))}
            row["dense_over_sparse"] = round(row["dense_ms"] / row["sparse_ms"], 2)
            row["sparse_ms"], row["dense_ms"] = round(row["sparse_ms"], 3), round(row["dense_ms"], 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps({
        "command": "python benchmarks/centroid_head.py",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu_threads": torch.get_num_threads(), "platform": platform.platform()},
        "vocab": VOCAB, "centroids": CENTROIDS, "top_k": TOP_K, "rows": rows}, indent=2) + "\n")
    lines = ["# Centroid-masked draft head on CPU: sparse argmax vs dense masked scatter", "",
             "`python benchmarks/centroid_head.py` (vLLM's `Gemma4MTPMaskedEmbedder`, V=262,144, 2,048 centroids, "
             "top 32)", "", "| hidden | rows | sparse ms | dense ms | dense / sparse | same tokens |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['hidden']} | {r['rows']} | {r['sparse_ms']} | {r['dense_ms']} | {r['dense_over_sparse']} | "
              f"{r['identical_tokens']} |" for r in rows]
    (OUT / "summary.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
