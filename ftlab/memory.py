"""Peak-VRAM estimator: predicts the peak GPU memory of one training trial from the
composed config alone (architecture numbers, quantisation, LoRA, optimizer, batch,
sequence length, checkpointing, attention). Pure arithmetic: no torch, no weights.

Units: bytes per term; `total_gb` and `budget.vram_gb` are GiB (2**30 bytes), the unit
torch.cuda and nvidia-smi (MiB) report, so "a 24 GB card" means 24 GiB here.

The formula (every term is a separate entry of `MemoryEstimate.terms`):

  weights          frozen/trained base weights. 16-bit: 2 B/param. bitsandbytes 4-bit:
                   0.5 B/param for the decoder linears; 8-bit (LLM.int8): 1 B/param.
                   Under bnb the embeddings, lm_head and norms stay in the compute dtype
                   (transformers keeps lm_head unquantised; Embedding/RMSNorm are not
                   nn.Linear). Full fine-tune (`peft=full`): ftlab loads fp32 master
                   weights (4 B/param) and computes under bf16 autocast.
  weight_copies    full fine-tune only: autocast's bf16 copies of the linear weights, kept
                   by autograd for the backward (2 B/param; HF "model memory anatomy":
                   mixed precision costs 6 B/param of weights).
  quant_state      NF4 absmax constants (Dettmers et al. 2023, QLoRA, section 3):
                   no double quant: one fp32 per 64-weight block = 32/64 = 0.5 bit/param;
                   double quant: 8-bit absmax per 64 + one fp32 per 256 of those
                   = 8/64 + 32/(64*256) = 0.127 bit/param (saves 0.373 bit/param).
                   LLM.int8: one fp32 scale per output row.
  lora_params      r*(d_in + d_out) per targeted linear per layer, in peft.adapter_dtype
                   (fp32 by default: PEFT upcasts adapters, `autocast_adapter_dtype`).
  grads            one gradient per trainable parameter, in its dtype.
  optimizer        AdamW: 2 fp32 states = 8 B/param; 8-bit Adam (bnb, blockwise 2048):
                   2 B/param + 2 fp32 absmax per 2048; Lion/SGD-momentum: 1 state.
                   Paged variants (paged_adamw_*) are counted in full: paging only helps
                   when the GPU is already out of memory (QLoRA paper, section 3).
  activations      per token, per decoder layer, in the compute dtype (Korthikanti et al.
                   2022 "Reducing Activation Recomputation", adapted to Llama: RMSNorm
                   with fp32 upcast 8h B, q/k/v after RoPE + attention output 4h+4kv B,
                   SwiGLU gate/silu/up/product 8i B, plus each LoRA-targeted linear's input
                   copy and its rank-r hidden). SDPA/flash keep no S x S matrix; eager
                   keeps fp32 + bf16 softmax probabilities (6 B per head per S^2).
                   Gradient checkpointing (HF): only every layer's input (2h B/token) is
                   kept, plus one layer recomputed during the backward and the gradients
                   flowing through it (counted as 2 layers' worth).
  logits           lm_head output V per token in the compute dtype, its fp32 upcast for the
                   loss, the fp32 log-softmax and the fp32 gradient: (2 + 3*4) V B/token
                   (HF ForCausalLMLoss upcasts logits to fp32). ftlab computes logits on
                   completion tokens only, but the estimate is the conservative
                   full-sequence case.
  cuda_context     0.5 GiB for the CUDA context and kernels (nvidia-smi on an idle
                   process: 0.3-0.8 GiB depending on CUDA version and lazy loading).
  allocator_overhead  PyTorch caching-allocator fragmentation: 10% of the allocated
                   terms (reserved/allocated ratios of 1.05-1.2 are typical in training).

Sequence length is train.max_seq_length per sample whether or not packing is on (packed
rows are full; padded batches are at most that long), so the estimate is an upper bound
for the batch. The terms are summed, which is conservative: in reality grads grow while
activations are freed during the backward. `MemoryEstimate.allocated_bytes` (everything
but context and fragmentation) is what torch.cuda.max_memory_allocated measures.

Sources: QLoRA paper (Dettmers et al. 2023, arXiv:2305.14314); bitsandbytes docs (4-bit,
LLM.int8, 8-bit optimizers, paged optimizers); HF transformers "Model training anatomy"
and "Efficient training on a single GPU"; PEFT LoRA docs; torchtune "memory
optimization overview"; Unsloth's Llama 3.1 / 3.3 context-length benchmarks (HF + FA2
baselines), used as reference figures in tests/test_memory.py.
"""
from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import hydra
from omegaconf import DictConfig, ListConfig, OmegaConf

from ftlab.config import ConfigError, ModelError, exit_2_on  # and registers the structured-config schema
from ftlab.config import check as check_config
from ftlab import attention, device

log = logging.getLogger("ftlab")
PRESETS = Path(__file__).resolve().parent / "conf" / "model"

GIB = 2**30
CUDA_CONTEXT_BYTES = 0.5 * GIB
ALLOCATOR_OVERHEAD = 0.10
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TERM_ORDER = ("weights", "weight_copies", "quant_state", "lora_params", "grads", "optimizer",
              "activations", "logits", "cuda_context", "allocator_overhead")
DTYPE_BYTES = {"float32": 4, "fp32": 4, "float": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "half": 2}


class BudgetError(ConfigError):
    """A config the estimator cannot price, naming the key to fix."""


class OverBudget(BudgetError):
    """The trial was not started: its predicted peak exceeds budget.vram_gb. A sweep
    records it as skipped (grid) or pruned (Optuna) and goes on."""

    def __init__(self, reason: str, predicted_gb: float, run_id: str, run_name: str, remedy: str):
        super().__init__(self.said(reason, remedy))
        self.reason, self.predicted_gb, self.run_id, self.run_name = reason, predicted_gb, run_id, run_name

    @staticmethod
    def said(reason: str, remedy: str) -> str:
        return f"{reason}; not started: {remedy}"


@dataclass
class MemoryEstimate:
    """Predicted peak training memory, one entry per term, in bytes."""

    terms: dict[str, float]
    notes: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> float:
        return float(sum(self.terms.values()))

    @property
    def total_gb(self) -> float:
        """Total in GiB (2**30 bytes): the unit of budget.vram_gb."""
        return self.total_bytes / GIB

    @property
    def allocated_bytes(self) -> float:
        """What torch.cuda.max_memory_allocated would show: no context, no fragmentation."""
        return self.total_bytes - self.terms.get("cuda_context", 0.0) - self.terms.get("allocator_overhead", 0.0)

    def table(self) -> str:
        total = self.total_bytes or 1.0
        names = [n for n in TERM_ORDER if n in self.terms] + [n for n in self.terms if n not in TERM_ORDER]
        lines = [f"{'term':<20}{'GiB':>10}{'share':>8}"]
        for name in names:
            lines.append(f"{name:<20}{self.terms[name] / GIB:>10.2f}{self.terms[name] / total:>8.1%}")
        lines.append(f"{'total':<20}{self.total_gb:>10.2f}{1:>8.0%}")
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


@dataclass(frozen=True)
class Settings:
    """The numbers the estimate depends on, read once from the config."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    method: str
    bits: int
    double_quant: bool
    adapter_bytes: int
    compute_bytes: int
    rank: int
    targets: tuple[str, ...]
    lora_dropout: float
    optim: str
    batch: int
    seq: int
    checkpointing: bool
    attn: str


def settings(cfg: DictConfig) -> Settings:
    """Read and validate the knobs the estimate uses; errors name the config key."""
    a, peft, train = cfg.model.arch, cfg.peft, cfg.train
    method = str(peft.method)
    if method not in ("qlora", "lora", "full"):
        raise BudgetError(f"peft.method={method!r}: use qlora, lora or full")
    bits = int(peft.load_in_bits)
    if bits not in (4, 8, 16):
        raise BudgetError(f"peft.load_in_bits={bits}: use 4, 8 or 16")
    if method != "full" and int(cfg.lora_r) < 1:
        raise BudgetError(f"lora_r={cfg.lora_r}: the LoRA rank must be >= 1")
    for key, value in (("train.per_device_batch_size", train.per_device_batch_size),
                       ("train.max_seq_length", train.max_seq_length)):
        if int(value) < 1:
            raise BudgetError(f"{key}={value}: must be >= 1")
    if a.head_dim is None and a.hidden_size % a.num_heads:
        raise BudgetError(f"model.arch.hidden_size={a.hidden_size} is not a multiple of model.arch.num_heads="
                          f"{a.num_heads} (set model.arch.head_dim where the model's heads are narrower or wider)")
    compute = str(cfg.model.dtype)
    adapter = str(peft.adapter_dtype)
    if adapter not in DTYPE_BYTES:
        raise BudgetError(f"peft.adapter_dtype={adapter!r}: use one of {sorted(DTYPE_BYTES)}")
    return Settings(
        hidden=int(a.hidden_size), layers=int(a.num_layers), heads=int(a.num_heads), kv_heads=int(a.num_kv_heads),
        head_dim=int(a.head_dim or a.hidden_size // a.num_heads),
        intermediate=int(a.intermediate_size), vocab=int(a.vocab_size), tied=bool(a.tie_word_embeddings),
        method=method, bits=16 if method == "full" else bits, double_quant=bool(peft.double_quant),
        adapter_bytes=DTYPE_BYTES[adapter],
        # auto = bf16 on any GPU worth estimating for
        compute_bytes=DTYPE_BYTES.get(compute, 2),
        rank=int(cfg.lora_r), targets=target_names(cfg.target_modules),
        lora_dropout=float(cfg.lora_dropout), optim=str(train.optim),
        batch=int(train.per_device_batch_size), seq=int(train.max_seq_length),
        checkpointing=checkpointing_setting(train.gradient_checkpointing),
        attn=str(cfg.model.attn_implementation),
    )


def checkpointing_setting(value) -> bool:
    """train.gradient_checkpointing as priced: `auto` not yet resolved (resolve_checkpointing)
    is priced on, the smaller of the two."""
    if value not in (True, False, "auto"):
        raise BudgetError(f"train.gradient_checkpointing={value!r}: use true, false or auto")
    return value in (True, "auto")


def device_memory_gb() -> float:
    """What a trial may use, for train.gradient_checkpointing=auto: the GPU's memory, or the
    RAM available now on a CPU. (torch is imported here, and only with a GPU: pricing a config
    needs no torch.)"""
    if device.cuda_available():
        import torch

        return torch.cuda.get_device_properties(0).total_memory / GIB
    import psutil

    return psutil.virtual_memory().available / GIB


# model.arch field -> the config.json key a Llama-family checkpoint stores it under
ARCH_KEYS = {"hidden_size": "hidden_size", "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
             "num_kv_heads": "num_key_value_heads", "intermediate_size": "intermediate_size",
             "vocab_size": "vocab_size", "tie_word_embeddings": "tie_word_embeddings",
             "max_position_embeddings": "max_position_embeddings", "head_dim": "head_dim"}


def _gguf_config(path: Path) -> dict:
    """A GGUF file's architecture numbers under config.json's names (its metadata, no weights read)."""
    stat = path.stat()
    return dict(_read_gguf_config(str(path), stat.st_mtime_ns, stat.st_size))


@functools.lru_cache(maxsize=4)  # parsing takes 1-3 s: once per file (and version of it) a process, not per call
def _read_gguf_config(path: str, mtime_ns: int, size: int) -> dict:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as e:  # not GGUF, truncated: the reader's own exceptions vary
        raise ConfigError(f"model.name_or_path: {path} is not a readable GGUF file ({type(e).__name__}: {e})") from None
    fields = reader.fields

    def value(key: str):
        return fields[key].contents() if key in fields else None

    arch = value("general.architecture")
    tokens = value("tokenizer.ggml.tokens")
    return {"hidden_size": value(f"{arch}.embedding_length"), "num_hidden_layers": value(f"{arch}.block_count"),
            "num_attention_heads": value(f"{arch}.attention.head_count"),
            "num_key_value_heads": value(f"{arch}.attention.head_count_kv"),
            "intermediate_size": value(f"{arch}.feed_forward_length"),
            "vocab_size": value(f"{arch}.vocab_size") or (len(tokens) if tokens else None),
            "max_position_embeddings": value(f"{arch}.context_length"),
            "head_dim": value(f"{arch}.attention.key_length"),  # llama.cpp writes it where heads are not hidden / heads
            "tie_word_embeddings": not any(t.name == "output.weight" for t in reader.tensors),
            "model_type": arch}  # llama.cpp's architecture names: llama, qwen2, gemma, gptneox, ...


def _hub_config(repo_id: str) -> dict | None:
    """A hub model's config.json from the local hub cache (a model downloaded before), or None. Not
    from the network: the budget check answers in well under a second, and the hub client retries
    an unreachable host for half a minute."""
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(repo_id, "config.json")
        return json.loads(Path(cached).read_text(encoding="utf-8")) if isinstance(cached, str) else None
    except (OSError, ValueError):  # not a repo id, unreadable, not JSON
        return None


def preset_name_or_path(name: str) -> str | None:
    """The model a preset of ftlab's (conf/model/<name>.yaml) names; None for a model of the user's."""
    preset = PRESETS / f"{name}.yaml"
    return OmegaConf.load(preset).get("name_or_path") if preset.is_file() else None


def path_like(name_or_path: str) -> bool:
    """A filesystem path, never a hub id (org/name): absolute, or starting with '.' or '~'."""
    return Path(name_or_path).is_absolute() or name_or_path.startswith((".", "~"))


def local_model_path(name_or_path: str) -> Path | None:
    """The checkpoint directory or .gguf file model.name_or_path names; None for a hub id. What is not
    there or not a model is an error, here (the estimate) as when the run resolves it (ftlab.models)."""
    local = Path(name_or_path).expanduser()
    if local.is_dir() and not (local / "config.json").is_file():
        raise ModelError(f"model.name_or_path: {local.resolve()} is a directory without config.json, not a Hugging "
                         "Face checkpoint")
    if local.exists() and not local.is_dir() and local.suffix != ".gguf":
        raise ModelError(f"model.name_or_path: {local.resolve()} is neither a checkpoint directory nor a .gguf file")
    if local.exists():
        return local
    if local.suffix == ".gguf" or path_like(name_or_path):
        raise ModelError(f"model.name_or_path: {local} does not exist")
    return None


# What every Llama-family config.json states; without them it is another architecture's (GPT-2's
# n_embd, n_layer) and would be priced with the preset's shapes.
SHAPE_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
# Decoder layers under model.model with Llama's projection names (transformers' model types).
LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "smollm3", "granite", "olmo",
                "olmo2")


def _named_model_config(model) -> tuple[str, dict, str] | None:
    """(where, config.json numbers, name) of the model model.name_or_path names: a local directory's
    config.json, a .gguf file's metadata, or another hub model's config.json in the hub cache.
    None for the preset's own model, or a model.name of the user's (with its model.arch)."""
    local = local_model_path(model.name_or_path)
    if local and local.suffix == ".gguf" and local.is_file():
        return str(local), _gguf_config(local), local.stem
    if local and (local / "config.json").is_file():
        try:
            found = json.loads((local / "config.json").read_text("utf-8"))
        except (OSError, ValueError) as e:
            raise ConfigError(f"model.name_or_path: {local / 'config.json'} is not readable JSON ({e})") from None
        if not isinstance(found, dict):
            raise ConfigError(f"model.name_or_path: {local / 'config.json'} holds no JSON object of model settings")
        return str(local / "config.json"), found, local.resolve().name
    if preset_name_or_path(model.name) in (None, model.name_or_path):
        return None
    if (found := _hub_config(model.name_or_path)) is None:
        log.warning("model.name_or_path=%s is not preset %s's model, and its config.json is not in the hub cache: "
                    "the estimate prices %s's shapes; set model.arch.* to this model's, or download it first",
                    model.name_or_path, model.name, model.name)
        return None
    return f"{model.name_or_path}/config.json (hub cache)", found, model.name_or_path.rsplit("/", 1)[-1]


def _default_tied(model_type: str | None) -> bool:
    """Whether transformers ties the embeddings of a `model_type` whose config.json does not say
    (Llama, Mistral, Qwen2: no; Gemma: yes). Untied, the safe upper bound, when it does not know."""
    if model_type in ("llama", "mistral", "qwen2", "qwen3", None):
        return False
    try:
        from transformers import AutoConfig  # only here: a config.json that leaves it out

        return bool(AutoConfig.for_model(model_type).tie_word_embeddings)
    except Exception:
        return False


def resolve_arch(cfg: DictConfig) -> dict[str, tuple]:
    """model.arch from the numbers of the model model.name_or_path names (_named_model_config): a
    preset's describe the preset's model (python -m ftlab model.name_or_path=/my/llama keeps
    smollm2_135m's), and the estimate must price the model that will load; a preset's model.name
    then becomes that model's (run names, the UI). Returns {field: (preset value, its value)}."""
    if cfg.model.source == "random" and preset_name_or_path(cfg.model.name) not in (None, cfg.model.name_or_path):
        raise ConfigError(f"model.name_or_path={cfg.model.name_or_path}: model.source=random builds {cfg.model.name}'s "
                          "shapes with random weights and loads no checkpoint; drop model.source=random to train this one")
    if cfg.model.source not in ("auto", "hub"):  # tiny/random build a model from model.arch
        return {}
    if (named := _named_model_config(cfg.model)) is None:
        return {}
    where, found, name = named
    if missing := [key for key in SHAPE_KEYS if found.get(key) is None]:
        raise ConfigError(f"model.name_or_path: {where} has no {', '.join(missing)}: not a Llama-family model's "
                          "config (ftlab prices and trains Llama-architecture models: Llama, Mistral, Qwen2, ...)")
    # GPT-NeoX states the same five numbers, and failed in training after its base model was scored.
    if (model_type := found.get("model_type")) not in (None, *LLAMA_FAMILY):
        raise ConfigError(f"model.name_or_path: {where} is a {model_type} model: ftlab prices and trains "
                          f"Llama-architecture models (model_type {', '.join(LLAMA_FAMILY)})")
    if found.get("num_key_value_heads") is None:  # no grouped-query attention: one KV head per head
        found["num_key_value_heads"] = found["num_attention_heads"]
    if "tie_word_embeddings" not in found:  # transformers' default for its model type, not the preset's
        found["tie_word_embeddings"] = _default_tied(found.get("model_type"))
    try:  # head_dim spelled out as hidden_size / num_heads (Llama 3.2's config.json does) is the default, null
        if int(found["head_dim"]) * int(found["num_attention_heads"]) == int(found["hidden_size"]):
            found["head_dim"] = None
    except (KeyError, TypeError, ValueError):
        pass
    changed = {}
    for arch_key, key in ARCH_KEYS.items():
        preset, value = cfg.model.arch[arch_key], found.get(key)
        if value is None and (arch_key != "head_dim" or preset is None):
            continue  # not in the model's config: the preset's; no head_dim: hidden_size / num_heads
        if value is not None:
            if isinstance(value, (list, tuple)) and value and arch_key != "tie_word_embeddings":
                value = max(value)  # per-layer counts (some GGUFs): the largest layer's, an upper bound
            try:
                value = (int if preset is None else type(preset))(value)  # GGUF's numbers are numpy's
            except (TypeError, ValueError):
                value = None
            if value is None or isinstance(value, int) and not isinstance(value, bool) and value < 1:
                raise ConfigError(f"model.name_or_path: {where}: {key}={found[key]!r} is not a positive whole number")
        if value != preset:
            cfg.model.arch[arch_key] = value
            changed[arch_key] = (preset, value)
    arch = cfg.model.arch
    if arch.num_heads % arch.num_kv_heads or arch.head_dim is None and arch.hidden_size % arch.num_heads:
        raise ConfigError(f"model.name_or_path: {where}: num_attention_heads={arch.num_heads} must divide "
                          f"hidden_size={arch.hidden_size} (or the config set head_dim) and be a multiple of "
                          f"num_key_value_heads={arch.num_kv_heads}")
    if changed:
        log.info("model.arch from %s: %s", where, ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()))
        if (PRESETS / f"{cfg.model.name}.yaml").is_file():  # the preset's name, not this model's
            cfg.model.name = name
    return changed


def resolve_checkpointing(cfg: DictConfig, device_gb: float | None) -> bool:
    """train.gradient_checkpointing=auto -> off when the prediction without it fits the budget
    (budget.vram_gb, else `device_gb`, the device's memory), on otherwise or when neither is known."""
    value = cfg.train.gradient_checkpointing
    if value != "auto":
        return checkpointing_setting(value)
    limit = budget_gib(cfg) or device_gb
    if limit is None:
        return True
    without = replace(settings(cfg), checkpointing=False)
    return estimate_settings(without).total_gb > limit


def target_names(value) -> tuple[str, ...]:
    """`all-linear`, a comma string or a list -> the decoder linears LoRA wraps."""
    if isinstance(value, str):
        names = list(LINEARS) if value == "all-linear" else [m.strip() for m in value.split(",") if m.strip()]
    elif isinstance(value, (list, tuple, ListConfig)):
        names = [str(v) for v in value]
    else:
        raise BudgetError(f"target_modules={value!r}: use all-linear or a list such as [q_proj,v_proj]")
    if not names:  # peft would fail on it after the model loaded
        raise BudgetError(f"target_modules={value!r} names no module: use all-linear or a list such as [q_proj,v_proj]")
    unknown = [n for n in names if n not in LINEARS]
    if unknown:
        raise BudgetError(f"target_modules: {unknown} are not Llama linears; use all-linear or some of {list(LINEARS)}")
    return tuple(dict.fromkeys(names))


def linear_shapes(s: Settings) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each decoder linear, from the architecture numbers."""
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    h, i = s.hidden, s.intermediate
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def param_counts(s: Settings) -> dict[str, int]:
    """Parameter counts by kind: decoder linears, embeddings + lm_head, norms."""
    linear = s.layers * sum(din * dout for din, dout in linear_shapes(s).values())
    embed = s.vocab * s.hidden * (1 if s.tied else 2)
    norms = (2 * s.layers + 1) * s.hidden
    return {"linear": linear, "embedding": embed, "norm": norms}


def optimizer_bytes_per_param(name: str) -> float:
    name = name.lower()
    # AdEMAMix keeps two first moments (a fast and a slow EMA) beside the second: three states.
    states = 1 if "lion" in name else 3 if "ademamix" in name else 2
    if "8bit" in name:
        return states * (1 + 4 / 2048)  # blockwise: 1 B/state + an fp32 absmax per 2048
    if "lion" in name or name == "sgd":
        return 4.0  # one fp32 state (momentum); plain SGD without momentum would be 0
    if "adafactor" in name:
        return 0.1  # factored second moment: rows + columns, negligible per parameter
    return 4.0 * states  # AdamW family (adamw_torch, adamw_torch_fused, paged_adamw_32bit, ...), AdEMAMix


def estimate_settings(s: Settings) -> MemoryEstimate:
    """The estimate for already-read settings (fit_batch varies the batch this way)."""
    notes: list[str] = []
    counts = param_counts(s)
    shapes = linear_shapes(s)
    cb = s.compute_bytes
    tokens = s.batch * s.seq
    terms: dict[str, float] = {}

    if s.method == "full":
        total_params = sum(counts.values())
        terms["weights"] = 4.0 * total_params  # fp32 master weights (models.load_base)
        terms["weight_copies"] = cb * counts["linear"] if cb < 4 else 0.0
        terms["quant_state"] = 0.0
        terms["lora_params"] = 0.0
        trainable, trainable_bytes = total_params, 4
        optim = s.optim
    else:
        linear_bytes = {4: 0.5, 8: 1.0, 16: cb}[s.bits] * counts["linear"]
        terms["weights"] = linear_bytes + cb * (counts["embedding"] + counts["norm"])
        if s.bits == 4:
            bits_per_param = (8 / 64 + 32 / (64 * 256)) if s.double_quant else 32 / 64
            terms["quant_state"] = counts["linear"] * bits_per_param / 8
        elif s.bits == 8:
            terms["quant_state"] = 4.0 * s.layers * sum(dout for _, dout in shapes.values())
        else:
            terms["quant_state"] = 0.0
        trainable = s.layers * sum(s.rank * sum(shapes[t]) for t in s.targets)
        trainable_bytes = s.adapter_bytes
        terms["lora_params"] = float(trainable * trainable_bytes)
        optim = s.optim
    terms["grads"] = float(trainable * trainable_bytes)
    terms["optimizer"] = trainable * optimizer_bytes_per_param(optim)

    terms["activations"] = float(activation_bytes(s, tokens))
    terms["logits"] = float(tokens * s.vocab * (cb + 3 * 4))
    allocated = sum(terms.values())
    terms["cuda_context"] = CUDA_CONTEXT_BYTES
    terms["allocator_overhead"] = ALLOCATOR_OVERHEAD * allocated
    return MemoryEstimate(terms=terms, notes=notes)


def activation_bytes(s: Settings, tokens: int) -> float:
    """Saved activations of the decoder stack for `tokens` = batch * seq tokens."""
    if s.attn == attention.SHORT_EAGER and s.seq >= attention.EAGER_BELOW_KEYS:
        # Eager below the threshold, SDPA from it: the larger of the two worst cases.
        short = attention.EAGER_BELOW_KEYS - 1
        return max(activation_bytes(replace(s, attn="sdpa"), tokens),
                   activation_bytes(replace(s, attn="eager", seq=short), tokens * short // s.seq))
    h, i, cb = s.hidden, s.intermediate, s.compute_bytes
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    shapes = linear_shapes(s)
    per_token = 2 * (4 * h + 2 * cb * h)  # two RMSNorms: fp32 upcast input, normalised, output
    per_token += cb * (2 * q + 2 * kv)  # q, k after RoPE, v, attention output
    per_token += cb * 4 * i  # SwiGLU: gate, silu(gate), up, product
    if s.method != "full":
        for t in s.targets:
            din, _ = shapes[t]
            # PEFT's lora_A gets its own cast copy of the input; then the rank-r hidden
            per_token += cb * (din + s.rank)
            if s.lora_dropout > 0:
                per_token += (cb + 1) * din  # dropped copy + mask
    layer = per_token * tokens
    if s.attn in ("eager", attention.SHORT_EAGER):  # SHORT_EAGER here: every batch is shorter than its threshold
        # HF eager attention: fp32 softmax output + its bf16 cast, per head, S x S
        layer += s.batch * s.heads * s.seq * s.seq * (4 + cb)
    if s.checkpointing:
        stack = s.layers * cb * h * tokens + 2 * layer  # kept layer inputs + one recomputed layer and its grads
    else:
        stack = s.layers * layer
    mask = 0 if s.attn == "flash_attention_2" else s.batch * s.seq * s.seq * cb  # 4D additive mask, built once
    return stack + mask + tokens * cb * 2 * h  # + embedding output and final norm output


def eval_batch_tokens(cfg: DictConfig) -> int:
    """eval.max_batch_tokens, or as many tokens (rows x (longest prompt + new tokens)) as one
    eval batch may hold so that its KV cache (every layer) and one layer's prefill activations
    fit in what the training step's activations and logits were priced at: both are freed
    when training ends, so held-out generation stays within what the budget checked."""
    if cfg.eval.max_batch_tokens:
        return int(cfg.eval.max_batch_tokens)
    s = settings(cfg)
    priced = estimate_settings(s).terms
    kv = s.kv_heads * s.head_dim
    # Keys and values of every layer: in HF's cache in the compute dtype, or on the CPU in fp32 where
    # row attention keeps them (scoring.RowAlignedKeys), each row's rounded up to a block of keys: at
    # most attention.DECODE_KEY_BLOCK - 1 more per row of at least max_new_tokens + 1.
    rounding = 1 + (attention.DECODE_KEY_BLOCK - 1) / (cfg.eval.max_new_tokens + 1)
    per_token = s.layers * 2 * kv * max(s.compute_bytes, 4 * rounding)
    per_token += activation_bytes(replace(s, layers=1, batch=1, seq=1, checkpointing=False), 1)
    per_token += 3 * s.heads * 4 * rounding  # a CPU decode step's scores, softmax and mask (one layer)
    return max(1, int((priced["activations"] + priced["logits"]) // per_token))


def estimate(cfg: DictConfig) -> MemoryEstimate:
    """Predicted peak training memory of `cfg` (the full composed ftlab config)."""
    return estimate_settings(settings(cfg))


def budget_gib(cfg: DictConfig) -> float | None:
    """The effective budget: budget.vram_gb, lowered to just below budget.oom_at_gb when an
    earlier trial of the sweep ran out of memory at that predicted size."""
    value = None if cfg.budget.vram_gb is None else float(cfg.budget.vram_gb)  # > 0: config.check
    if cfg.budget.oom_at_gb is not None:
        below_oom = float(cfg.budget.oom_at_gb) * (1 - 1e-6)
        value = below_oom if value is None else min(value, below_oom)
    return value


def check_budget(cfg: DictConfig) -> tuple[bool, MemoryEstimate, str]:
    """(fits, estimate, reason). Fits when no budget is set or the prediction is within it."""
    budget = budget_gib(cfg)
    est = estimate(cfg)
    if budget is None:
        return True, est, f"predicted peak {est.total_gb:.1f} GiB; no budget set (budget.vram_gb=null)"
    fits = est.total_gb <= budget
    verdict = "fits" if fits else "over budget"
    if cfg.budget.vram_gb is not None and budget == float(cfg.budget.vram_gb):
        limit = f"budget.vram_gb={budget:g} GiB"
    else:
        limit = (f"{cfg.budget.oom_at_gb:.3g} GiB predicted for a trial of this sweep that ran out of memory "
                 f"(budget.oom_at_gb)")
    return fits, est, (f"predicted peak {est.total_gb:.3g} GiB vs {limit}: {verdict} "
                       f"(micro-batch {cfg.train.per_device_batch_size} x seq {cfg.train.max_seq_length})")


def fit_batch(cfg: DictConfig) -> tuple[int, int] | None:
    """For budget.fit=auto_batch: (micro_batch, grad_accum), the largest micro-batch up to the
    config's that divides its effective batch and fits, gradient accumulation making up the rest:
    the same effective batch, so the run trains as configured. None if even micro-batch 1 does
    not fit; the config's own pair when no budget is set."""
    budget = budget_gib(cfg)
    s = settings(cfg)
    effective = s.batch * int(cfg.train.grad_accum)
    for batch in range(s.batch, 0, -1):
        if effective % batch == 0 and (budget is None or estimate_settings(replace(s, batch=batch)).total_gb <= budget):
            return batch, effective // batch
    return None


def over_budget_remedy(cfg: DictConfig) -> str:
    """What would make an over-budget config fit: budget.fit=auto_batch's micro-batch, or, when
    even micro-batch 1 is over, the settings that shrink what does not depend on the batch."""
    if pair := fit_batch(cfg):
        setting = f"train.per_device_batch_size={pair[0]} train.grad_accum={pair[1]}"
        return f"auto_batch: {setting} fits" if cfg.budget.fit == "auto_batch" else \
            f"set budget.fit=auto_batch to run it as {setting}"
    s = settings(cfg)
    one = estimate_settings(replace(s, batch=1))
    budget = budget_gib(cfg)
    if budget is not None and one.terms.get("cuda_context", 0.0) >= budget * GIB:
        return (f"the CUDA context alone takes {CUDA_CONTEXT_BYTES / GIB:.3g} GiB of any GPU's memory: no model fits "
                f"a budget of {budget:.3g} GiB")
    # A shorter sequence shrinks activations and logits only: where the rest (weights, optimizer,
    # context) is already over the budget, shortening cannot make it fit and is not suggested.
    fixed = estimate_settings(replace(s, batch=1, seq=1)).total_gb
    def at_micro_batch_1(setting: str, **changes) -> list[str]:
        """`setting (N GiB at micro-batch 1)` where it lowers the peak; each says how far it gets."""
        gb = estimate_settings(replace(s, batch=1, **changes)).total_gb
        return [f"{setting} ({gb:.3g} GiB at micro-batch 1)"] if gb < one.total_gb else []

    # Checkpointing keeps one layer's activations instead of all: where it is off, the first thing to try.
    # A high rank's adapter, gradients and optimizer state can outweigh the 4-bit weights (r=1024 on 8B).
    ways = [*(at_micro_batch_1("set train.gradient_checkpointing=true", checkpointing=True) if not s.checkpointing
              else []),
            *(["lower train.max_seq_length"] if budget is None or fixed <= budget else []),
            *(at_micro_batch_1("set lora_r=16", rank=16) if s.method != "full" and s.rank > 16 else []),
            *(at_micro_batch_1("set peft=qlora", method="qlora", bits=4) if s.bits > 4 else []),
            "choose a smaller model"]
    said = f"{', '.join(ways[:-1])} or {ways[-1]}" if len(ways) > 1 else ways[0]
    return (f"even micro-batch 1 needs {one.total_gb:.3g} GiB, {one.terms['weights'] / GIB:.3g} GiB of it the "
            f"weights: {said}")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
@exit_2_on(ConfigError)
def main(cfg: DictConfig) -> None:
    """`python -m ftlab.memory model=llama31_8b lora_r=64 ...`: the estimate, no weights."""
    check_config(cfg)
    resolve_arch(cfg)
    # As the run on this machine resolves it (pipeline.run): without a budget, by this device's memory.
    cfg.train.gradient_checkpointing = resolve_checkpointing(cfg, device_memory_gb())
    fits, est, reason = check_budget(cfg)
    print(f"{cfg.model.name} {cfg.peft.method} ({cfg.peft.load_in_bits}-bit), lora_r={cfg.lora_r}, "
          f"targets={cfg.target_modules}, batch {cfg.train.per_device_batch_size} x seq {cfg.train.max_seq_length}, "
          f"checkpointing={cfg.train.gradient_checkpointing}, optim={cfg.train.optim}")
    print(est.table())
    print(reason)
    if not fits:
        print(over_budget_remedy(cfg))


if __name__ == "__main__":
    main()
