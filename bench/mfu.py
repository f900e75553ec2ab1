"""Model FLOP utilisation of ftlab training against this machine's measured matmul peak.

Peak: a large square matmul in the compute dtype (bf16 where supported), all cores.
Training: ftlab's default SmolLM2 QLoRA run (bench/train_throughput.py variant B).

FLOPs per real token, LoRA on a frozen base (no weight gradients for the base, and no
recomputation counted: this is MFU, not hardware FLOP utilisation):
    base linears      2*N (forward) + 2*N (activation backward),  N = decoder linear params
    adapters          2*R (forward) + 4*R (activation + weight backward), R = LoRA params
    attention         3 * 4 * L * d * S/2 (QK^T and AV, causal: half the context on average;
                      d = heads x head width, the hidden size in most Llama models)
    LM head           4 * V*d * f  (f = share of tokens that carry a label: ftlab computes
                      logits only there, so only those FLOPs are needed)

    python bench/mfu.py [model] [steps]
"""
from __future__ import annotations

import torch

from ftlab import memory
from common import arg, matmul_flops
from train_throughput import load_case, run_variant


def flops_per_token(cfg, seq_len: float, label_share: float) -> float:
    s = memory.settings(cfg)
    shapes = memory.linear_shapes(s).values()  # (in, out) of q k v o gate up down
    base = s.layers * sum(i * o for i, o in shapes)
    adapters = s.layers * sum(s.rank * (i + o) for i, o in shapes)
    attention = 3 * 4 * s.layers * s.heads * s.head_dim * seq_len / 2
    head = 4 * s.vocab * s.hidden * label_share
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
    per_token = flops_per_token(cfg, mean_len, label_share)
    result = run_variant("B", model, "default", steps)
    achieved = per_token * result["tokens_per_s"]
    print(f"training: {result['tokens_per_s']:.0f} real tok/s x {per_token / 1e6:.0f} MFLOP/token "
          f"(mean length {mean_len:.0f}, label share {label_share:.2f}) = {achieved / 1e9:.1f} GFLOP/s")
    print(f"SUMMARY mfu: {achieved / peak:.1%} of the measured {dtype} matmul peak ({model})")


if __name__ == "__main__":
    main()
