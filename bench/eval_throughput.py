"""Held-out evaluation: one example at a time vs ftlab's batched, length-sorted generation.

Same model, same prompts, greedy decoding; the outputs must be identical.

    python bench/eval_throughput.py                  # SmolLM2-135M (NF4), 32 held-out prompts
    python bench/eval_throughput.py tiny 64
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    from hydra import compose, initialize_config_dir

    import ftlab.config  # noqa: F401
    from ftlab import models, scoring
    from ftlab.data import prepare

    model_name = sys.argv[1] if len(sys.argv) > 1 else "smollm2_135m"
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 32
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"model={model_name}", f"data.eval_size={n}"])
    ckpt = models.resolve_checkpoint(cfg.model, cfg.cache_dir)
    tokenizer = models.load_tokenizer(ckpt)
    data = prepare(cfg.data, tokenizer, cfg.train.max_seq_length, models.cache_root(cfg.cache_dir))
    model = models.load_base(ckpt, cfg.model, cfg.peft)
    dtype = models.compute_dtype(cfg.model.dtype)
    prompts = [e.prompt for e in data.held_out]
    max_new = cfg.eval.max_new_tokens

    timings = {}
    outputs = {}
    for name, batch in (("sequential", 1), ("batched", cfg.eval.batch_size)):
        start = time.perf_counter()
        outputs[name] = scoring.generate(model, tokenizer, prompts, batch, max_new, dtype, desc=name)
        timings[name] = time.perf_counter() - start
        print(f"{name:<11} batch {batch:>3}: {timings[name]:7.1f} s for {len(prompts)} prompts", flush=True)
    same = sum(a == b for a, b in zip(outputs["sequential"], outputs["batched"]))
    print(f"identical greedy outputs: {same}/{len(prompts)}")
    print(f"SUMMARY eval throughput: batched/sequential = {timings['sequential'] / timings['batched']:.2f}x, "
          f"identical {same}/{len(prompts)} ({model_name}, {dtype})")
    if same != len(prompts):
        sys.exit(1)


if __name__ == "__main__":
    main()
