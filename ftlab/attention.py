"""Which attention a model trains with: model.attn_implementation=auto is SDPA on a GPU and
on a CPU computing in fp32; on a CPU computing in bf16 it is HF's eager attention (bf16
matmuls, an fp32 softmax) for batches shorter than EAGER_BELOW_KEYS keys, SDPA for longer ones.

Why: torch's CPU flash-attention kernel is slow for short sequences in bf16. Forward +
backward, 8 rows, 9 query / 3 key heads of 64 (SmolLM2), on an AVX512-BF16 EPYC: 128 keys
15.1 ms vs 6.7 ms eager, 160 keys 25.2 vs 14.8 ms; from 192 keys the kernel takes larger
query blocks and wins or ties (192: 19.8 vs 22.1 ms; 320: 45.5 vs 58.7 ms). In fp32 the
kernel wins at every length (an AVX2-only EPYC, the same shapes: 64 keys 3.8 vs 7.1 ms eager,
128 keys 12.2 vs 18.4, 192 keys 24.5 vs 36.3, 384 keys 89.7 vs 159.8). Eager keeps an S x S
probability matrix per head for the backward pass, which the memory estimate prices
(ftlab/memory.py), bounded here by the threshold.

Light on purpose: the memory estimate imports the names without torch or transformers.
"""
from __future__ import annotations

from ftlab import device

AUTO = "auto"
SHORT_EAGER = "ftlab_sdpa_short_eager"  # what auto is on the CPU
EAGER_BELOW_KEYS = 192
# Evaluation's CPU decode steps pad each row's keys to a multiple of this (scoring.decode_step_attention);
# 16 sufficed for bit-exact rows here (measured), 64 leaves room for wider reductions.
DECODE_KEY_BLOCK = 64


def resolve(name: str, dtype: str = "auto") -> str:
    """model.attn_implementation as the model is loaded with on this machine, for model.dtype:
    a name, all the memory estimate needs (a config turned away over budget never imports
    transformers)."""
    if name != AUTO:
        return name
    if device.cuda_available():
        return "sdpa"
    bf16 = dtype == "bfloat16" or (dtype == "auto" and device.cpu_has_bf16_units())
    return SHORT_EAGER if bf16 else "sdpa"


def check_loadable(name: str) -> None:
    """A run with flash attention on a machine without CUDA: refused before anything loads, not
    transformers' ImportError once the data and model have (the memory estimate may price it)."""
    if name.startswith("flash_attention") and not device.cuda_available():
        from ftlab.config import ConfigError

        raise ConfigError(f"model.attn_implementation={name} needs an NVIDIA GPU (and its kernels); use auto or sdpa")


def for_loading(name: str, dtype: str = "auto") -> str:
    """resolve(name, dtype), registered with transformers when it is ftlab's own."""
    name = resolve(name, dtype)
    if name == SHORT_EAGER:
        register()
    return name


def short_eager_mask(**kwargs):
    """Eager's additive float mask for the batches eager attends (shorter than the threshold),
    SDPA's own mask for the rest (often none at all: SDPA's is_causal)."""
    from transformers.masking_utils import eager_mask, sdpa_mask

    return (eager_mask if kwargs["kv_length"] < EAGER_BELOW_KEYS else sdpa_mask)(**kwargs)


def short_eager_attention(module, query, key, value, attention_mask, **kwargs):
    """Eager where `short_eager_mask` built eager's mask, SDPA elsewhere: one decision, made
    from the key length when the mask is built."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.models.llama.modeling_llama import eager_attention_forward

    if attention_mask is not None and attention_mask.is_floating_point():
        return eager_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register() -> None:
    """Make SHORT_EAGER a name transformers loads models with."""
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(SHORT_EAGER, short_eager_attention)
    AttentionMaskInterface.register(SHORT_EAGER, short_eager_mask)
