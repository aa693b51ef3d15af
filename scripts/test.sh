#!/usr/bin/env bash
# Set up (first run only) and run the test suite. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Test-only torchvision for Gemma 4's multimodal stack on CPU (tests/mm/sitecustomize.py), kept outside
# site-packages: what scripts/serve.sh installs stays as it is.
[ -d .venv/test-torchvision/torchvision ] ||
  .venv/bin/python -m pip install -q --no-deps --target .venv/test-torchvision torchvision==0.28.0
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2}
exec .venv/bin/python -m pytest -q -rs --durations=15 "$@"
