"""Benchmark plain decoding, vLLM's own MTP and the plugin on the bundled fixture, in one run.

    python -m vllm_mtp_gemma4.bench --quick      # proves the harness works (CI), < 5 min on 2 cores
    python -m vllm_mtp_gemma4.bench --full       # batch {1, 8, 32} x K 1..5 x temperature {0, 0.8}
    python -m vllm_mtp_gemma4.bench --full --ks 3 --batches 1,8 --repeats 5 --out /tmp/bench

Writes ``results.json``, ``summary.md``, PNG plots and one engine log per engine to ``--out``
(default ``benchmarks/results/<mode>/``) and prints the summary.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from tqdm import tqdm

from vllm_mtp_gemma4.bench import FIXTURE_DIR
from vllm_mtp_gemma4.bench.report import machine_info, summarize, write_report
from vllm_mtp_gemma4.bench.sweep import BASELINE, METHODS, Settings, run_sweep, total_steps

MODES = {
    # Small enough for CI on 2 cores: it checks the harness end to end, not speed.
    "quick": {"batches": [1, 8], "ks": [3], "temperatures": [0.0], "repeats": 1, "max_tokens": 32,
              "num_prompts": 8, "eager": True},
    # Compiled engines, as served.
    "full": {"batches": [1, 8, 32], "ks": [1, 2, 3, 4, 5], "temperatures": [0.0, 0.8], "repeats": 3,
             "max_tokens": 128, "num_prompts": 32, "eager": False},
}
FIXTURE_FILES = ("target", "assistant", "held_out_prompts.json")


def _list(kind: type) -> Callable[[str], list]:
    def parse(text: str) -> list:
        return [kind(v) for v in text.split(",") if v.strip()]

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m vllm_mtp_gemma4.bench",
                                     description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    for name, preset in MODES.items():
        mode.add_argument(f"--{name}", dest="mode", action="store_const", const=name,
                          help=", ".join(f"{k}={v}" for k, v in preset.items()))
    parser.add_argument("--out", type=Path, help="output directory (default benchmarks/results/<mode>)")
    parser.add_argument("--fixture", type=Path, default=FIXTURE_DIR,
                        help="model pair: target/, assistant/, held_out_prompts.json (default %(default)s)")
    parser.add_argument("--batches", type=_list(int), help="comma-separated batch sizes")
    parser.add_argument("--ks", type=_list(int), help="comma-separated numbers of speculative tokens")
    parser.add_argument("--temperatures", type=_list(float), help="comma-separated temperatures")
    parser.add_argument("--repeats", type=int, help="timed passes per configuration")
    parser.add_argument("--max-tokens", type=int, help="tokens generated per prompt")
    parser.add_argument("--prompts", type=int, dest="num_prompts", help="prompts per timed pass")
    parser.add_argument("--eager", action=argparse.BooleanOptionalAction,
                        help="enforce_eager engines (default: on for --quick, off for --full)")
    parser.add_argument("--dtype", default="float32", help="engine dtype (default %(default)s)")
    parser.add_argument("--methods", type=_list(str), default=list(METHODS),
                        help=f"comma-separated subset of {', '.join(METHODS)}; must include {BASELINE}")
    parser.add_argument("--method-k", action="append", default=[], metavar="METHOD=K[,K...]",
                        help="run a speculative method at these Ks only (repeatable), e.g. upstream=3")
    return parser


def _method_ks(parser: argparse.ArgumentParser, values: list[str], methods: list[str],
               ks: list[int]) -> dict[str, list[int]]:
    chosen = {}
    for value in values:
        name, _, listed = value.partition("=")
        try:
            chosen[name] = _list(int)(listed)
        except ValueError:
            chosen[name] = []
        if name not in methods or not METHODS[name].speculative or not chosen[name] or set(chosen[name]) - set(ks):
            parser.error(f"--method-k {value}: expected a speculative method of --methods, '=', and Ks of --ks")
    return chosen


def parse_args(argv: list[str]) -> tuple[Settings, Path]:
    parser = build_parser()
    args = parser.parse_args(argv)
    preset = MODES[args.mode]
    chosen = {key: getattr(args, key) if getattr(args, key) is not None else default
              for key, default in preset.items()}
    fixture = args.fixture.resolve()  # engines run from their log directory
    missing = [name for name in FIXTURE_FILES if not (fixture / name).exists()]
    if missing:
        parser.error(f"--fixture {fixture}: missing {', '.join(missing)}")
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown or BASELINE not in args.methods:
        parser.error(f"--methods: unknown {unknown}" if unknown else f"--methods must include {BASELINE}")
    counts = [*chosen["batches"], *chosen["ks"],
              *(chosen[k] for k in ("repeats", "max_tokens", "num_prompts"))]
    if any(v < 1 for v in counts) or not all(chosen[k] for k in ("batches", "ks", "temperatures")):
        parser.error("batch sizes, Ks, repeats, max tokens and prompts must be >= 1, lists non-empty")
    methods = [m for m in METHODS if m in args.methods]
    method_ks = _method_ks(parser, args.method_k, methods, chosen["ks"])
    settings = Settings(mode=args.mode, fixture=fixture, dtype=args.dtype, methods=methods, method_ks=method_ks,
                        **chosen)
    return settings, args.out or Path("benchmarks/results") / args.mode


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    settings, out = parse_args(argv)
    date, started = datetime.now(timezone.utc).isoformat(timespec="seconds"), time.perf_counter()
    with tqdm(total=total_steps(settings), unit="step", file=sys.stderr) as progress:
        sweep = run_sweep(settings, out / "logs", progress)
    results = {
        "command": shlex.join(["python", "-m", "vllm_mtp_gemma4.bench", *argv]),
        "cwd": str(Path.cwd()), "date": date, "wall_seconds": round(time.perf_counter() - started, 1),
        "machine": machine_info(), "settings": settings.to_json(),
        "methods": {name: asdict(METHODS[name]) for name in settings.methods},
        "engines": sweep.engines, "configs": summarize(sweep), "passes": sweep.passes,
    }
    print(write_report(out, results, settings))


if __name__ == "__main__":
    main()
