"""Benchmark harness: plugin vs upstream MTP vs plain decoding, and its engine-job runner."""

import os
from pathlib import Path

FIXTURE_DIR = Path(os.environ.get("VLLM_MTP_GEMMA4_FIXTURE", "fixtures/gemma4-tiny")).resolve()
"""The bundled tiny Gemma 4 pair the benchmarks run on: the repository's ``fixtures/gemma4-tiny`` from its root
(where the README's commands run), or ``VLLM_MTP_GEMMA4_FIXTURE``; an installed wheel does not carry it."""
