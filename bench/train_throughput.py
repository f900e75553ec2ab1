"""Train throughput: the seed's recipe through TRL defaults (A) vs ftlab's default run (B).

Same model, same cleaned data, same optimizer steps and effective batch, same
quantisation (NF4 double quant, r=16, alpha=16, all-linear, bs 8 x ga 2, lr 2e-4).
A is what a user writes from a blog post: SFTTrainer with a model id, peft_config
and TRL's defaults for everything else. Each variant runs in its own process (ftlab
tunes the allocator process-wide), alternating A/B so machine noise hits both.

TRL's default is bf16 autocast. On a CPU without bf16 units (AVX2 only) torch runs bf16
matmuls ~100x slower than fp32 (1.3 vs 129 GFLOP/s measured on an AVX2 EPYC), so a step
of A would take ~15 minutes there: A then sets bf16=False, the one change such a user
must make, both compute in fp32, and the bench prints the two matmul speeds it measured.

    python bench/train_throughput.py                        # SmolLM2-135M and tiny, both datasets
    python bench/train_throughput.py tiny 6                 # model, optimizer steps
    python bench/train_throughput.py smollm2_135m 3 varied  # ... and one dataset (default, varied)
"""
from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

from common import arg, compose_config, matmul_flops


def load_case(model: str, dataset: str):
    from ftlab import models
    from ftlab.data import prepare

    cfg = compose_config(f"model={model}", "train.max_seq_length=1024")
    ckpt = models.resolve_checkpoint(cfg.model, cfg.cache_dir)
    tokenizer = models.load_tokenizer(ckpt)
    data = prepare(cfg.data, tokenizer, cfg.train.max_seq_length, models.cache_root(cfg.cache_dir))
    if dataset == "varied":
        # Widely varying lengths: a pasted log of 0-600 words on most tickets, so padding matters.
        rng = random.Random(0)
        for ex in data.train + data.held_out:
            words = rng.choice([0, 0, 20, 60, 150, 300, 600])
            filler = " ".join(rng.choice(["retry", "timeout", "worker", "ok", "error", "queue"]) for _ in range(words))
            ex.messages[-2] = {**ex.messages[-2], "content": ex.messages[-2]["content"] + " " + filler}
    return cfg, ckpt, tokenizer, data


def completion_loss(model, tokenizer, examples, dtype) -> float:
    """Mean NLL of the reference answers given their prompts, the same measure for A and B
    (TRL's own eval loss for A counts prompt tokens too, ftlab's only the answer)."""
    import torch

    total, count = 0.0, 0
    model.eval()
    for ex in examples:
        prompt = tokenizer.apply_chat_template(ex.prompt, tokenize=True, add_generation_prompt=True, return_dict=False)
        full = tokenizer.apply_chat_template(ex.messages, tokenize=True, return_dict=False)
        ids = torch.tensor([full])
        labels = ids.clone()
        labels[0, : len(prompt)] = -100
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = model(input_ids=ids, labels=labels).loss
        n = int((labels[0, 1:] != -100).sum())
        total, count = total + float(loss) * n, count + n
    return total / count


def run_variant(variant: str, model: str, dataset: str, steps: int) -> dict:
    import torch
    from datasets import Dataset

    from ftlab import models
    from ftlab.train import PeakMemory

    cfg, ckpt, tokenizer, data = load_case(model, dataset)
    train_rows, eval_rows = data.trl_rows("train"), data.trl_rows("held_out")
    out = Path("/tmp/ftlab-bench") / f"{variant}-{model}-{dataset}"
    dtype = models.compute_dtype(cfg.model.dtype)  # bf16 where the hardware has bf16 units, else fp32
    if variant == "A":
        from peft import LoraConfig
        from transformers import BitsAndBytesConfig
        from trl import SFTConfig, SFTTrainer

        args = SFTConfig(
            output_dir=str(out), per_device_train_batch_size=8, gradient_accumulation_steps=2, learning_rate=2e-4,
            max_steps=steps, logging_steps=1, report_to="none", save_strategy="no", use_cpu=not torch.cuda.is_available(),
            bf16=None if dtype == torch.bfloat16 else False,  # None: TRL's default (bf16)
            model_init_kwargs={"dtype": dtype, "quantization_config": BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=dtype)},
        )
        trainer = SFTTrainer(
            model=str(ckpt), args=args, train_dataset=Dataset.from_list(train_rows),
            eval_dataset=Dataset.from_list(eval_rows), processing_class=tokenizer,
            peft_config=LoraConfig(r=16, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"),
        )
        with PeakMemory() as peak:
            start = time.perf_counter()
            trainer.train()
            seconds = time.perf_counter() - start
        eval_loss = completion_loss(trainer.model, tokenizer, data.held_out, dtype)
        tokens = next(e["num_tokens"] for e in reversed(trainer.state.log_history) if "num_tokens" in e)
    else:
        from transformers import set_seed

        from ftlab.memory import device_memory_gb, resolve_checkpointing
        from ftlab.train import train

        cfg.train.max_steps = steps
        cfg.train.gradient_checkpointing = resolve_checkpointing(cfg, device_memory_gb())
        cfg.train.save_adapter = False
        model_obj = models.load_base(ckpt, cfg.model, cfg.peft)
        set_seed(cfg.seed)  # as ftlab's recipe does: the adapter's initial weights, so runs repeat
        model_obj = models.add_adapter(model_obj, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.target_modules,
                                       cfg.train.gradient_checkpointing, cfg.peft.adapter_dtype)
        result = train(model_obj, tokenizer, data, cfg.train, cfg.lr, cfg.seed, out, dtype)
        seconds, tokens = result.train_seconds, result.trained_tokens
        eval_loss = completion_loss(model_obj, tokenizer, data.held_out, dtype)
        peak = type("Peak", (), {"peak_mb": result.peak_memory_mb})
    return {"variant": variant, "model": model, "dataset": dataset, "seconds": seconds, "tokens": tokens,
            "tokens_per_s": tokens / seconds, "peak_mb": peak.peak_mb, "eval_loss": eval_loss}  # held-out answer-token loss


def computes_in_fp32() -> bool:
    import torch

    from ftlab import models

    return models.compute_dtype("auto") == torch.float32


def matmul_speeds() -> str:
    """A 1024x576 by 576x1536 matmul (an MLP projection of SmolLM2 on a batch) in fp32 and bf16."""
    import torch

    return ", ".join(f"{name} {matmul_flops(dtype, 1024, 576, 1536, reps=3) / 1e9:.1f} GFLOP/s"
                     for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--variant":
        print("RESULT " + json.dumps(run_variant(*sys.argv[2:5], int(sys.argv[5]))))
        return
    model_list = [arg(1, None)] if len(sys.argv) > 1 else ["tiny", "smollm2_135m"]
    steps = arg(2, 6, int)
    datasets = [arg(3, None)] if len(sys.argv) > 3 else ["default", "varied"]
    if computes_in_fp32():
        print(f"no bf16 units: A runs TRL's defaults with bf16=False (matmul here: {matmul_speeds()})", flush=True)
    results = []
    for model in model_list:
        for dataset in datasets:
            for variant in ("A", "B"):
                proc = subprocess.run([sys.executable, __file__, "--variant", variant, model, dataset, str(steps)],
                                      capture_output=True, text=True)
                line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    sys.exit(f"variant {variant} {model} {dataset} failed:\n{proc.stderr[-3000:]}")
                results.append(json.loads(line[7:]))
                r = results[-1]
                print(f"{r['model']:<13} {r['dataset']:<8} {variant}  {r['tokens_per_s']:8.0f} tok/s  "
                      f"{r['seconds']:7.1f} s  peak {r['peak_mb']:7.0f} MB  eval loss {r['eval_loss']:.4f}", flush=True)
    ratios = []
    for a, b in zip(results[::2], results[1::2]):
        ratio = b["tokens_per_s"] / a["tokens_per_s"]
        ratios.append(f"{a['model']}/{a['dataset']} B/A={ratio:.2f} (eval loss {b['eval_loss']:.3f} vs {a['eval_loss']:.3f})")
    print("SUMMARY train throughput: " + "; ".join(ratios))


if __name__ == "__main__":
    main()
