"""model.attn_implementation=auto: SDPA on a GPU and in fp32, and on a CPU computing in bf16
eager attention for short batches (where torch's CPU flash kernel is slow in bf16), SDPA for
long ones."""
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import eager_mask, sdpa_mask
from transformers.models.llama.modeling_llama import eager_attention_forward

from ftlab import attention


def test_auto_is_the_short_eager_attention_on_a_cpu_in_bf16_and_other_names_stay():
    from ftlab import models

    on_cpu = not torch.cuda.is_available()
    assert attention.resolve("auto", "bfloat16") == (attention.SHORT_EAGER if on_cpu else "sdpa")
    assert attention.resolve("auto", "float32") == "sdpa"
    computes_in_bf16 = models.compute_dtype("auto") == torch.bfloat16
    assert attention.resolve("auto") == (attention.SHORT_EAGER if on_cpu and computes_in_bf16 else "sdpa")
    assert attention.resolve("eager") == "eager" and attention.resolve("sdpa") == "sdpa"
    assert attention.resolve("eager", "float32") == "eager"


def test_short_batches_attend_eagerly_and_long_ones_through_sdpa():
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal, module.training = 2, True, True
    torch.manual_seed(0)
    for length in (attention.EAGER_BELOW_KEYS - 1, attention.EAGER_BELOW_KEYS):
        query = torch.randn(2, 4, length, 16, dtype=torch.bfloat16)
        key, value = torch.randn(2, 2, 2, length, 16, dtype=torch.bfloat16)
        shape = {"batch_size": 2, "q_length": length, "kv_length": length, "dtype": torch.bfloat16}
        mask = attention.short_eager_mask(**shape, allow_is_causal_skip=True)
        out, _ = attention.short_eager_attention(module, query, key, value, mask, scaling=0.25, dropout=0.0)
        eager, _ = eager_attention_forward(module, query, key, value, eager_mask(**shape), scaling=0.25, dropout=0.0)
        sdpa, _ = sdpa_attention_forward(module, query, key, value, sdpa_mask(**shape, allow_is_causal_skip=True),
                                         scaling=0.25, dropout=0.0)
        assert not torch.equal(eager, sdpa)  # the two differ in their rounding: the check below can tell them apart
        expected = eager if length < attention.EAGER_BELOW_KEYS else sdpa
        assert torch.equal(out, expected), length
        torch.testing.assert_close(eager, sdpa, atol=2e-2, rtol=2e-2)  # both the same causal attention


def test_a_model_loaded_with_auto_trains_and_saves_a_config_others_can_load(tmp_path):
    """The registered name never reaches config.json: vLLM and `transformers serve` load the
    saved (merged) model with their own attention."""
    import json

    from ftlab import models
    from ftlab.config import ModelConfig, PeftConfig

    cfg = ModelConfig(name="tiny", name_or_path="tiny", source="tiny")
    ckpt = models.resolve_checkpoint(cfg, str(tmp_path))
    model = models.load_base(ckpt, cfg, PeftConfig(method="lora", load_in_bits=16))
    assert model.config._attn_implementation == attention.resolve("auto")
    ids = torch.randint(3, 100, (2, 24))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and model.model.layers[0].self_attn.q_proj.weight.grad is not None
    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert attention.SHORT_EAGER not in json.dumps(saved)
