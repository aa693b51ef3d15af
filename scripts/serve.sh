#!/usr/bin/env bash
# Set up (first run only) and serve the bundled tiny Gemma 4 pair with MTP on 127.0.0.1.
#   bash scripts/serve.sh            # PORT=8000 by default; extra args go to `vllm serve`
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate

PORT=${PORT:-8000}
MODEL=fixtures/gemma4-tiny/target
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2}
python -m vllm_mtp_gemma4.checkpoint "$MODEL" fixtures/gemma4-tiny/assistant

vllm serve "$MODEL" --host 127.0.0.1 --port "$PORT" --served-model-name gemma4-tiny \
  --speculative-config configs/mtp.json --reasoning-parser gemma4 \
  --max-model-len 4096 --gpu-memory-utilization 0.2 "$@" &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null' INT TERM EXIT

until curl -sf "http://127.0.0.1:$PORT/health" >/dev/null; do
  kill -0 $server 2>/dev/null || { echo "serve: vllm serve exited before it was ready" >&2; exit 1; }
  sleep 1
done
cat <<MSG

==> Serving gemma4-tiny (Gemma 4 target + MTP assistant) on http://127.0.0.1:$PORT  (Ctrl-C stops it)

  curl http://127.0.0.1:$PORT/v1/completions -H 'Content-Type: application/json' \\
    -d '{"model": "gemma4-tiny", "prompt": "def fibonacci(n):\\n", "max_tokens": 48, "temperature": 0}'

  .venv/bin/python -c "from openai import OpenAI; c = OpenAI(base_url='http://127.0.0.1:$PORT/v1', api_key='none'); \\
print(c.completions.create(model='gemma4-tiny', prompt='import os\\n', max_tokens=32).choices[0].text)"

  curl -s http://127.0.0.1:$PORT/metrics | grep spec_decode     # acceptance counters
MSG
wait $server
