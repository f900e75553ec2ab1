"""Held-out evaluation: one example at a time vs ftlab's batched, length-sorted generation.

Same model, same prompts, greedy decoding, each prompt's `generate` alone timed in two halves
run before and after the batched passes. Two one-at-a-time baselines, both through
scoring.generate at batch 1 (so they get the same contiguous LM-head input):
- "sequential": ftlab's own evaluation numerics (attention in fp32 on the CPU), one prompt at
  a time: the ratio is what batching alone buys, and outputs must be identical;
- "plain": what a user writes, `generate` on the model's own (bf16) SDPA attention: outputs
  can differ where the coarser bf16 softmax flips a near-tie; the logit gap is printed.
A third pass runs the same batches with eval.batch_invariant=false (SDPA's fused kernel over
the padded keys, as ftlab did before it attended row by row): what that layout costs and changes.

    python bench/eval_throughput.py                  # SmolLM2-135M (NF4), 32 held-out prompts, base model
    python bench/eval_throughput.py tiny 64
    python bench/eval_throughput.py smollm2_135m 32 model.dtype=bfloat16   # any further config overrides
    python bench/eval_throughput.py smollm2_135m 40 --adapter outputs/runs/<run id>/adapter   # a trained adapter
"""
from __future__ import annotations

import sys
import time

from common import arg, compose_config


def main() -> None:
    from ftlab import memory, models, scoring
    from ftlab.data import prepare

    model_name, n = arg(1, "smollm2_135m"), arg(2, 32, int)
    overrides, adapter = sys.argv[3:], None
    if "--adapter" in overrides:  # what ftlab evaluates after training: answers that end on their own
        at = overrides.index("--adapter")
        adapter, overrides = overrides[at + 1], overrides[:at] + overrides[at + 2 :]
    # SDPA as a user loads the model (ftlab's CPU default attends short batches eagerly); the batched and
    # sequential passes swap in row attention either way.
    cfg = compose_config(f"model={model_name}", f"data.eval_size={n}", "model.attn_implementation=sdpa", *overrides)
    ckpt = models.resolve_checkpoint(cfg.model, cfg.cache_dir)
    tokenizer = models.load_tokenizer(ckpt)
    data = prepare(cfg.data, tokenizer, cfg.train.max_seq_length, models.cache_root(cfg.cache_dir))
    model = models.load_base(ckpt, cfg.model, cfg.peft)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    dtype = models.compute_dtype(cfg.model.dtype)
    prompts = [e.prompt for e in data.held_out]
    max_new = cfg.eval.max_new_tokens

    def timed(run):
        start = time.perf_counter()
        result = run()
        return result, time.perf_counter() - start

    def one_at_a_time(some: list, name: str, max_new_tokens: int = max_new) -> list[str]:
        """`generate` on each prompt alone: ftlab's attention (sequential) or the model's own SDPA (plain)."""
        return scoring.generate(model, tokenizer, some, 1, max_new_tokens, dtype, name,
                                batch_invariant=name == "sequential")

    for name in ("sequential", "plain"):  # warm-up: first calls' one-off costs count for neither
        one_at_a_time(prompts[:1], name, 2)
    scoring.generate(model, tokenizer, prompts[:2], 2, 2, dtype, "warm-up")
    # The one-at-a-time passes run in two halves around the batched ones, so a machine that slows
    # down or speeds up during the run (these are shared) weighs on both sides of the ratio alike.
    half = len(prompts) // 2
    outputs, timings = {}, {}
    for name in ("sequential", "plain"):
        outputs[name], timings[name] = timed(lambda: one_at_a_time(prompts[:half], name))
    cap = memory.eval_batch_tokens(cfg)
    outputs["batched"], timings["batched"] = timed(lambda: scoring.generate(
        model, tokenizer, prompts, cfg.eval.batch_size, max_new, dtype, "batched", max_batch_tokens=cap))
    # eval.batch_invariant=false: SDPA's fused kernel over the padded keys
    outputs["fused"], timings["fused"] = timed(lambda: scoring.generate(
        model, tokenizer, prompts, cfg.eval.batch_size, max_new, dtype, "fused", batch_invariant=False,
        max_batch_tokens=cap))
    for name in ("plain", "sequential"):
        rest, seconds = timed(lambda: one_at_a_time(prompts[half:], name))
        outputs[name] += rest
        timings[name] += seconds
    identical = {}
    lengths = [len(scoring.prompt_ids(tokenizer, p)) for p in prompts]
    rows = "+".join(str(len(b)) for b in scoring.length_sorted_batches(lengths, cfg.eval.batch_size, cap, max_new))
    for name, batches in (("sequential", f"{len(prompts)}x1"), ("plain", f"{len(prompts)}x1"), ("batched", rows),
                          ("fused", rows)):
        identical[name] = sum(a == b for a, b in zip(outputs["sequential"], outputs[name]))
        print(f"{name:<11} batches {batches:>6}: {timings[name]:7.1f} s for {len(prompts)} prompts, "
              f"{identical[name]}/{len(prompts)} identical to sequential", flush=True)
    n = len(prompts)
    gaps = {name: [tie_gap(model, tokenizer, p, a, b, dtype)
                   for p, a, b in zip(prompts, outputs["sequential"], outputs[name]) if a != b]
            for name in ("batched", "plain")}
    for name, gap in gaps.items():
        if gap:
            print(f"{len(gap)} {name} outputs diverge where the two candidate tokens' logits differ by at most "
                  f"{max(gap):.3f} (a near-tie that rounding flips; a padding or position bug would diverge at a "
                  f"clear winner)")

    def against(name: str) -> str:
        gap = f" (the rest at near-ties, gap <= {max(gaps[name]):.3f})" if gaps.get(name) else ""
        return f"identical {identical[name]}/{n}{gap}"

    print(f"SUMMARY eval throughput: batched/sequential = {timings['sequential'] / timings['batched']:.2f}x, "
          f"{against('batched')}; batched/plain generate = {timings['plain'] / timings['batched']:.2f}x, "
          f"{against('plain')}; fused kernel over padding {timings['sequential'] / timings['fused']:.2f}x, "
          f"identical {identical['fused']}/{n} ({model_name}, {dtype})")


def tie_gap(model, tokenizer, prompt, first: str, second: str, dtype) -> float:
    """|logit difference| of the two outputs' tokens where they first diverge, batch size 1."""
    import torch

    from ftlab import scoring

    a, b = (tokenizer(t, add_special_tokens=False).input_ids for t in (first, second))
    k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    if k >= min(len(a), len(b)):  # one output stops where the other goes on: compare with end of turn
        a, b = a + [tokenizer.eos_token_id], b + [tokenizer.eos_token_id]
    context = scoring.prompt_ids(tokenizer, prompt)
    device = next(model.parameters()).device
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        logits = model(input_ids=torch.tensor([context + a[:k]], device=device)).logits[0, -1].float()
    return abs(float(logits[a[k]] - logits[b[k]]))


if __name__ == "__main__":
    main()
