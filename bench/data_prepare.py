"""Data stage on a 50,000-record JSONL: validate + dedupe + length + split, then the cached reload.

Target: under 60 s on 2 CPU cores with the real tokenizer. Prints the time of each step,
records/s, and the cache's speed-up (a sweep's trials after the first pay only the reload).

    python bench/data_prepare.py                  # SmolLM2-135M tokenizer, 50,000 records
    python bench/data_prepare.py tiny 10000
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from common import arg, compose_config


def main() -> None:
    from ftlab import models
    from ftlab.data import clean, prepare
    from ftlab.data.generate import generate, write_jsonl
    from ftlab.data.prepare import load_examples

    model_name, n = arg(1, "smollm2_135m"), arg(2, 50_000, int)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_jsonl(generate(n, seed=11), Path(tmp) / "big.jsonl")
        cfg = compose_config(f"model={model_name}", f"data.path={path}", "data.eval_size=0.05")
        tokenizer = models.load_tokenizer(models.resolve_checkpoint(cfg.model, cfg.cache_dir))
        print(f"{n} records, {path.stat().st_size / 1e6:.1f} MB, tokenizer {model_name}, "
              f"max_seq_length {cfg.train.max_seq_length}")

        # Step by step (the same functions prepare() calls), to show where the time goes.
        t0 = time.perf_counter()
        examples, _ = load_examples(str(path), cfg.data)
        t1 = time.perf_counter()
        examples, _ = clean.drop_exact_duplicates(examples)
        t2 = time.perf_counter()
        examples, _ = clean.drop_near_duplicates(examples, cfg.data.near_dup_threshold)
        t3 = time.perf_counter()
        examples, _ = clean.fit_length(examples, tokenizer, cfg.train.max_seq_length, cfg.data.overlong)
        t4 = time.perf_counter()
        for step, seconds in (("validate", t1 - t0), ("exact dedupe", t2 - t1), ("near dedupe", t3 - t2),
                              ("tokenize + length", t4 - t3)):
            print(f"  {step:<18} {seconds:6.1f} s")

        cache = Path(tmp) / "cache"
        start = time.perf_counter()
        data = prepare(cfg.data, tokenizer, cfg.train.max_seq_length, cache)
        cold = time.perf_counter() - start
        start = time.perf_counter()
        again = prepare(cfg.data, tokenizer, cfg.train.max_seq_length, cache)
        warm = time.perf_counter() - start
        assert again.cache_hit and again.fingerprint == data.fingerprint
        c = data.report["counts"]
        print(f"prepare (cold): {cold:.1f} s = {n / cold:,.0f} records/s "
              f"({'under' if cold < 60 else 'OVER'} the 60 s target); kept {c['train_records']} train + "
              f"{c['held_out_records']} held-out")
        print(f"prepare (cached): {warm:.2f} s, {cold / warm:.0f}x faster")


if __name__ == "__main__":
    main()
