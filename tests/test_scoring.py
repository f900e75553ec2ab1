"""Held-out scoring: metric math, and batched generation equal to one-at-a-time."""
import pytest
import torch

from ftlab import models, scoring
from ftlab.config import EvalConfig, ModelConfig, PeftConfig
from ftlab.data.generate import generate


def test_metrics_on_known_strings():
    refs = ['{"a":"x","b":"y"}', '{"a":"z","b":"w"}']
    preds = ['{"a":"x","b":"y"}', "not json at all"]
    m = scoring.text_metrics(preds, refs, EvalConfig())
    assert m["exact_match"] == 0.5
    assert m["json_valid"] == 0.5
    assert m["json_field_accuracy"] == 0.5
    assert 0.5 <= m["rouge_l"] < 1.0
    assert 0.0 < m["bertscore_f1"] < 1.0


def test_empty_prediction_scores_zero_bertscore():
    m = scoring.text_metrics(["", "hello world"], ["hello world", "hello world"], EvalConfig())
    assert m["bertscore_f1"] == pytest.approx(0.5, abs=1e-3)


def tiny_model(tmp_path, dtype=torch.float32, hidden_size=64, intermediate_size=128):
    """A tiny random 2-layer model (4 query heads over 2 key heads, 512 tokens) and its tokenizer."""
    cfg = ModelConfig(name="tiny", name_or_path="tiny", source="tiny")
    cfg.arch.hidden_size, cfg.arch.intermediate_size, cfg.arch.num_layers, cfg.arch.vocab_size = (
        hidden_size, intermediate_size, 2, 512)
    cfg.arch.num_heads, cfg.arch.num_kv_heads = 4, 2
    ckpt = models.resolve_checkpoint(cfg, str(tmp_path))
    model = models.load_base(ckpt, cfg, PeftConfig(method="lora", load_in_bits=16)).to(dtype)
    return model, models.load_tokenizer(ckpt)


def step_logits(model, tokenizer, rows: list[list[int]], new_tokens: int) -> torch.Tensor:
    """Greedy generation of `new_tokens` after left-padded token rows, with the cache scoring.generate
    would use: every step's logits, (rows, steps, vocab)."""
    width = max(map(len, rows))
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, pad_token_id=tokenizer.pad_token_id, output_logits=True,
                         return_dict_in_generate=True, cache=scoring.generation_cache(model.device))
    return torch.stack(out.logits, 1)


def tiny_chat_model(tmp_path):
    """A tiny random fp32 model, its tokenizer and 12 chat prompts from the default data."""
    model, tokenizer = tiny_model(tmp_path)
    # A random model tends to repeat one token (often a newline or the end token); forbid
    # special and whitespace-only tokens so the comparison is over non-empty generations.
    model.generation_config.suppress_tokens = [
        i for i in range(len(tokenizer)) if i in tokenizer.all_special_ids or not tokenizer.decode([i]).strip()
    ]
    records = generate(12, seed=3)
    prompts = [[{"role": "user", "content": r["instruction"] + "\n\n" + r["input"]}] for r in records]
    return model, tokenizer, prompts


def test_batched_generation_matches_one_at_a_time(tmp_path):
    model, tokenizer, prompts = tiny_chat_model(tmp_path)
    batched = scoring.generate(model, tokenizer, prompts, batch_size=6, max_new_tokens=12)
    single = scoring.generate(model, tokenizer, prompts, batch_size=1, max_new_tokens=12)
    assert batched == single
    assert any(batched)


def test_a_model_off_row_attention_generates_as_it_would_without_evaluation_numerics(tmp_path):
    """Eager attention is left as it is (and keeps HF's own cache): the same outputs either way."""
    model, tokenizer, prompts = tiny_chat_model(tmp_path)
    model.set_attn_implementation("eager")
    invariant = scoring.generate(model, tokenizer, prompts, batch_size=6, max_new_tokens=8)
    assert invariant == scoring.generate(model, tokenizer, prompts, batch_size=6, max_new_tokens=8,
                                         batch_invariant=False)


def test_decode_steps_give_each_row_its_own_bits_at_any_batch_and_padding():
    """A decode step attends every row of a left-padded batch at once (CPU), and each row's
    result is bit for bit what the row computes alone, unpadded, across key lengths that
    cross the padding blocks; and it is attention: close to SDPA's."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 3, True
    heads, kv_heads, dim = 9, 3, 64  # SmolLM2's attention
    torch.manual_seed(0)
    lengths = torch.randint(1, 400, (24,)).tolist()
    width = max(lengths)
    # bf16 values in fp32 tensors (what autocast hands over), so the results are compared unrounded
    query = torch.randn(len(lengths), heads, 1, dim).bfloat16().float()
    key, value = torch.randn(2, len(lengths), kv_heads, width, dim).bfloat16().float()
    mask = torch.stack([torch.arange(width) >= width - n for n in lengths])[:, None, None]
    out, _ = scoring.row_sdpa_attention(module, query, key, value, mask)
    for row, n in enumerate(lengths):
        q, k, v = query[row : row + 1], key[row : row + 1, :, width - n :], value[row : row + 1, :, width - n :]
        alone, _ = scoring.row_sdpa_attention(module, q, k, v, None)
        assert torch.equal(out[row], alone[0]), f"row {row} ({n} keys)"
        torch.testing.assert_close(alone, sdpa_attention_forward(module, q, k, v, None)[0])


def linear_is_batch_invariant(dtype) -> bool:
    """Whether this machine's matmul gives a row the same bits alone as in a batch, at the test
    model's widths and row counts: BLAS libraries may pick another kernel by the row count (MKL's
    fp32 path for a few rows; oneDNN's bf16 AMX kernels between 33 and ~500 rows), which no
    attention layout can undo. A lone row of over 1024 inputs is scoring's care: not probed."""
    torch.manual_seed(0)
    for inputs, outputs, lone in ((576, 1536, True), (1536, 576, False)):
        x, w = torch.randn(300, inputs, dtype=dtype), torch.randn(outputs, inputs, dtype=dtype)
        batch = torch.nn.functional.linear(x, w)
        for rows in (1, 2, 7, 32, 64) if lone else (2, 7, 32, 64):
            if not torch.equal(torch.nn.functional.linear(x[:rows], w), batch[:rows]):
                return False
    return True


@pytest.mark.parametrize("dtype,intermediate_size", [(torch.float32, 256), (torch.bfloat16, 256), (torch.bfloat16, 1536)],
                         ids=["fp32", "bf16", "bf16-wide-down-projection"])
def test_batched_generation_logits_are_bit_identical(tmp_path, dtype, intermediate_size):
    """Not just the same tokens: every step's logits of a left-padded batch row equal the
    prompt's own, bit for bit (the fused SDPA kernel's rounding over padded keys and a mask
    flips near-ties in real models; so does torch's one-row bf16 kernel for a down projection
    of over 1024 inputs)."""
    if not linear_is_batch_invariant(dtype):
        pytest.skip(f"this machine's {dtype} matmul rounds a row differently at another row count")
    # SmolLM2's width: enough outputs for the one-row kernel's rare roundings to show
    model, tokenizer = tiny_model(tmp_path, dtype, hidden_size=576, intermediate_size=intermediate_size)
    model.eval()
    torch.manual_seed(0)
    prompts = [torch.randint(3, 512, (n,)).tolist() for n in (5, 17, 40, 41, 63)]

    with torch.inference_mode(), scoring.batch_invariant_numerics(model), scoring.contiguous_head_input(model):
        batched = step_logits(model, tokenizer, prompts, 6)
        for row, prompt in enumerate(prompts):  # alone: one row, no padding
            alone = step_logits(model, tokenizer, [prompt], 6)[0]
            assert torch.equal(batched[row], alone), f"prompt {row} ({len(prompt)} tokens)"


def test_evaluation_numerics_compute_the_models_own_logits(tmp_path):
    """Row attention with its step-to-step row-aligned keys is still the model's attention: a
    left-padded batch's logits at every generated step match HF's own SDPA over the same batch
    (fp32, to rounding), beyond the prefill and across a block of keys."""
    model, tokenizer = tiny_model(tmp_path)
    model.eval()
    torch.manual_seed(0)
    rows = [torch.randint(3, 512, (n,)).tolist() for n in (5, 30, 60)]
    with torch.inference_mode():
        own = step_logits(model, tokenizer, rows, 10)
        with scoring.batch_invariant_numerics(model):
            rows_aligned = step_logits(model, tokenizer, rows, 10)
    torch.testing.assert_close(rows_aligned, own, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("query_length", [None, 4], ids=["prefill", "chunk"])
def test_row_attention_equals_each_row_alone(query_length):
    """The attention layout itself, on any hardware: each left-padded row attends exactly as
    the unpadded prompt does (same keys, causal alignment, GQA), bit for bit; a chunk of
    queries after cached keys attends causally to the last keys. (Decode steps: above.)"""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 2, True
    lengths, heads, kv_heads, dim = [3, 9, 16], 4, 2, 8
    width = max(lengths)
    q_len = query_length or width
    torch.manual_seed(0)
    query = torch.randn(len(lengths), heads, q_len, dim)
    key, value = torch.randn(2, len(lengths), kv_heads, width, dim)
    causal = torch.ones(q_len, width, dtype=torch.bool).tril(width - q_len)
    mask = torch.stack([causal & (torch.arange(width) >= width - n) for n in lengths])[:, None]
    out, _ = scoring.row_sdpa_attention(module, query, key, value, mask)
    for row, n in enumerate(lengths):
        keep = min(n, q_len)
        q = query[row : row + 1, :, q_len - keep :]
        k, v = key[row : row + 1, :, width - n :], value[row : row + 1, :, width - n :]
        if 1 < keep < n:  # HF's SDPA path has no such layout without a mask: the math, by hand
            scores = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) / dim**0.5
            scores = scores.masked_fill(~torch.ones(keep, n, dtype=torch.bool).tril(n - keep), float("-inf"))
            alone = (scores.softmax(-1) @ v.repeat_interleave(2, 1)).transpose(1, 2)
            torch.testing.assert_close(out[row, q_len - keep :], alone[0], msg=f"row {row} ({n} tokens)")
        else:
            alone, _ = sdpa_attention_forward(module, q, k, v, None)
            assert torch.equal(out[row, q_len - keep :], alone[0]), f"row {row} ({n} tokens)"


def test_wide_linear_layers_compute_a_lone_row_as_two_while_evaluating():
    """Only plain linear layers wider than torch's one-row kernel threshold, only inside the block,
    and a layer's own forward (an accelerate hook's, say) is wrapped, then put back."""
    wide, narrow = torch.nn.Linear(1536, 16), torch.nn.Linear(1024, 16)
    seen = []
    plain_forward = wide.forward

    def hooked(x):
        seen.append(tuple(x.shape))
        return plain_forward(x)

    wide.forward = hooked
    model = torch.nn.ModuleList([wide, narrow])
    x = torch.randn(1, 1, 1536)
    with scoring.no_one_row_linears(model):
        assert wide(x).shape == (1, 1, 16) and wide(x.expand(3, 1, 1536)).shape == (3, 1, 16)
        assert "forward" not in narrow.__dict__
    assert seen == [(2, 1, 1536), (3, 1, 1536)]  # the lone row went through as two; a batch as it is
    assert wide.forward is hooked and "forward" not in narrow.__dict__


def test_row_attention_attends_in_fp32_on_the_cpu():
    """bf16 queries and keys (as autocast hands them over) are attended in fp32, under autocast
    too, and the result comes back in bf16: the fp32 kernel is the faster one on the CPU."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 2, True
    torch.manual_seed(0)
    query, key, value = torch.randn(1, 4, 30, 8), torch.randn(1, 2, 30, 8), torch.randn(1, 2, 30, 8)
    bf16 = [t.to(torch.bfloat16) for t in (query, key, value)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        prefill, _ = scoring.row_sdpa_attention(module, *bf16, None)
        decode, _ = scoring.row_sdpa_attention(module, bf16[0][:, :, -1:], *bf16[1:], None)
    exact, _ = sdpa_attention_forward(module, *(t.float() for t in bf16), None)
    assert prefill.dtype == decode.dtype == torch.bfloat16
    assert torch.equal(prefill, exact.to(torch.bfloat16))
    torch.testing.assert_close(decode.float(), exact[:, -1:].to(torch.bfloat16).float(), atol=0, rtol=2**-7)
    coarse, _ = sdpa_attention_forward(module, *bf16, None)  # the bf16 kernel rounds differently
    assert not torch.equal(prefill, coarse)


def test_length_sorted_batches_cap_rows_and_tokens():
    lengths = [30, 10, 20, 50, 40, 10]
    # 8 new tokens; a batch's tokens are rows x (its longest prompt + 8)
    batches = scoring.length_sorted_batches(lengths, max_rows=3, max_tokens=100, new_tokens=8)
    assert batches == [[1, 5, 2], [0, 4], [3]]  # 3 rows x 28 (row cap); 2 x 48 = 96; 3 x 58 > 100
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert scoring.length_sorted_batches(lengths, 4, None, 8) == [[1, 5, 2, 0], [4, 3]]
    assert scoring.length_sorted_batches([500, 5], 8, 100, 8) == [[1], [0]]  # too long alone: a batch of its own
