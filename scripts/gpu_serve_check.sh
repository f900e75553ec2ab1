#!/usr/bin/env bash
# On a GPU machine with vLLM installed: serve the promoted SmolLM2 model with `vllm serve`, send one
# held-out prompt through the openai client, print latency and tokens/s, stop the server.
#   scripts/gpu_serve_check.sh [registered-model-name] [extra ftlab.serve overrides...]
# Needs a `production` alias, e.g. after: python -m ftlab -m ... registry.auto_promote=true
#                                   or:   python -m ftlab.registry promote run_id=<trial>
set -euo pipefail
cd "$(dirname "$0")/.."

NAME="${1:-ftlab}"
shift || true

python -c "import vllm" 2>/dev/null || { echo "vLLM is not installed: pip install vllm" >&2; exit 2; }
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
  || { echo "no CUDA GPU visible to torch" >&2; exit 2; }

# engine=vllm fails loudly instead of quietly falling back to the CPU server.
exec python -m ftlab.serve "model=models:/${NAME}@production" engine=vllm check=true \
  port="${PORT:-8000}" api_key="${FTLAB_API_KEY:-gpu-check-key}" max_model_len="${MAX_MODEL_LEN:-2048}" "$@"
