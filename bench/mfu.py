"""Model FLOP utilisation of ftlab training against this machine's measured matmul peak.

Peak: a large square matmul in the compute dtype (bf16 where supported), all cores.
Training: ftlab's default SmolLM2 QLoRA run (bench/train_throughput.py variant B).

FLOPs per real token, LoRA on a frozen base (no weight gradients for the base, and no
recomputation counted: this is MFU, not hardware FLOP utilisation):
    base linears      2*N (forward) + 2*N (activation backward),  N = decoder linear params
    adapters          2*R (forward) + 4*R (activation + weight backward), R = LoRA params
    attention         3 * 4 * L * d * S/2 (QK^T and AV, causal: half the context on average)
    LM head           4 * V*d * f  (f = share of tokens that carry a label: ftlab computes
                      logits only there, so only those FLOPs are needed)

    python bench/mfu.py [model] [steps]
"""
from __future__ import annotations

import torch

from common import arg, matmul_flops
from train_throughput import load_case, run_variant


def flops_per_token(arch, lora_r: int, seq_len: float, label_share: float) -> float:
    d, layers, inter, vocab = arch.hidden_size, arch.num_layers, arch.intermediate_size, arch.vocab_size
    kv = d // arch.num_heads * arch.num_kv_heads
    shapes = [(d, d), (d, kv), (d, kv), (d, d), (d, inter), (d, inter), (inter, d)]  # q k v o gate up down
    base = layers * sum(i * o for i, o in shapes)
    adapters = layers * sum(lora_r * (i + o) for i, o in shapes)
    attention = 3 * 4 * layers * d * seq_len / 2
    head = 4 * vocab * d * label_share
    return 4 * base + 6 * adapters + attention + head


def main() -> None:
    model, steps = arg(1, "smollm2_135m"), arg(2, 4, int)
    from ftlab import models

    cfg, _, tokenizer, data = load_case(model, "default")
    dtype = models.compute_dtype(cfg.model.dtype)
    peak = matmul_flops(dtype, 4096, 4096, 4096, reps=10)
    print(f"matmul peak ({dtype}, {torch.get_num_threads()} threads): {peak / 1e9:.1f} GFLOP/s")
    rows = [tokenizer.apply_chat_template(e.messages, tokenize=True, return_dict=False) for e in data.train]
    prompt_lens = [len(tokenizer.apply_chat_template(e.prompt, tokenize=True, add_generation_prompt=True,
                                                     return_dict=False)) for e in data.train]
    mean_len = sum(map(len, rows)) / len(rows)
    label_share = 1 - sum(prompt_lens) / sum(map(len, rows))
    per_token = flops_per_token(cfg.model.arch, cfg.lora_r, mean_len, label_share)
    result = run_variant("B", model, "default", steps)
    achieved = per_token * result["tokens_per_s"]
    print(f"training: {result['tokens_per_s']:.0f} real tok/s x {per_token / 1e6:.0f} MFLOP/token "
          f"(mean length {mean_len:.0f}, label share {label_share:.2f}) = {achieved / 1e9:.1f} GFLOP/s")
    print(f"SUMMARY mfu: {achieved / peak:.1%} of the measured {dtype} matmul peak ({model})")


if __name__ == "__main__":
    main()
