"""The benchmark harness runs end to end (``--quick``) and its report can show a step-time split."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_mtp_gemma4.bench import report
from vllm_mtp_gemma4.bench.job import STEP_PHASES
from vllm_mtp_gemma4.bench.sweep import Settings, Sweep

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.engine
def test_quick_benchmark_writes_results_plots_and_summary(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "-m", "vllm_mtp_gemma4.bench", "--quick", "--out", str(out),
                           "--methods", "plain,upstream,plugin", "--batches", "1", "--max-tokens", "16"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]

    results = json.loads((out / "results.json").read_text())
    configs = results["configs"]
    assert {c["method"] for c in configs} == {"plain", "upstream", "plugin"}
    assert results["command"] and results["machine"]["cores"] and results["machine"]["vllm"]
    for c in configs:
        ratios = [c["ratio_vs_plain"]] + ([c["ratio_vs_upstream"]] if c["method"] == "plugin" else [])
        for ratio in ratios:
            assert math.isfinite(ratio["median"]) and ratio["median"] > 0, c
        assert c["kv_blocks"] > 0 and c["peak_rss_mib"] > 0, c
        if c["method"] == "plugin":  # the fused runner times its phases
            assert set(c["step_time_split"]) == set(STEP_PHASES) and all(
                v > 0 for v in c["step_time_split"].values()), c
        else:
            assert c["step_time_split"] is None  # upstream vLLM cannot split a step; never faked
    upstream = [c for c in configs if c["method"] == "upstream"]
    assert upstream and all(c["mean_acceptance_length"] > 1 for c in upstream), upstream
    for name in report.PLOTS:
        assert (out / name).stat().st_size > 0, name
    summary = (out / "summary.md").read_text()
    assert "plugin / upstream" in summary and summary in proc.stdout


def test_report_draws_a_measured_step_time_split(tmp_path):
    """The slot the plugin will fill: a measured split is averaged per configuration and drawn."""
    settings = Settings(mode="quick", fixture=tmp_path, batches=[1], ks=[3], temperatures=[0.0], repeats=1,
                        max_tokens=8, num_prompts=1, eager=True)
    split = {phase: 0.001 * (i + 1) for i, phase in enumerate(STEP_PHASES)}
    spec = {"num_drafts": 4, "num_draft_tokens": 12, "num_accepted_tokens": 6, "accepted_per_pos": [3, 2, 1]}
    # Two repeats; the plugin's second pass is slower: each ratio is taken within its repeat, then the median.
    passes = [{"method": m, "k": k, "group_k": 3, "repeat": r, "batch": 1, "temperature": 0.0, "seconds": s,
               "tokens": 8, "spec": spec if k else {}, "step_time_split": split if m == "plugin" else {}}
              for r, plugin_seconds in ((0, 0.25), (1, 0.5))
              for m, k, s in (("plain", None, 1.0), ("upstream", 3, 0.5), ("plugin", 3, plugin_seconds))]
    engines = [{"method": m, "k": k, "kv_blocks": 1, "block_size": 16, "peak_rss_bytes": 2**30}
               for m, k in (("plain", None), ("upstream", 3), ("plugin", 3))]
    rows = report.summarize(Sweep(engines=engines, passes=passes))

    plugin = next(r for r in rows if r["method"] == "plugin")
    assert plugin["step_time_split"] == pytest.approx(split)
    assert plugin["ratio_vs_plain"]["median"] == pytest.approx(3.0)  # of 4.0 and 2.0
    assert plugin["ratio_vs_upstream"]["median"] == pytest.approx(1.5)  # of 2.0 and 1.0
    assert plugin["mean_acceptance_length"] == pytest.approx(2.5)
    report.plot_step_time(rows, settings, tmp_path / "step_time.png")
    assert (tmp_path / "step_time.png").stat().st_size > 0
