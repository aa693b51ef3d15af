#!/usr/bin/env bash
# Set up (first run only) and run the test suite. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2}
exec .venv/bin/python -m pytest -q -rs --durations=15 "$@"
