"""The schema: overrides users type, and errors that name the bad key before any model loads."""
import re
import shutil
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from ftlab import config
from ftlab.config import ConfigError
from ftlab.pipeline import run
from tests.conftest import ROOT, run_cli


def test_top_level_knobs_override(make_cfg):
    cfg = make_cfg("lora_r=8", "lr=1e-4", "target_modules=[q_proj,v_proj]")
    assert cfg.lora_r == 8 and cfg.lr == 1e-4
    assert list(cfg.target_modules) == ["q_proj", "v_proj"]


def test_seed_recipe_is_the_default(make_cfg):
    cfg = make_cfg(tiny=False)
    assert cfg.model.name == "smollm2_135m"
    assert (cfg.peft.method, cfg.peft.load_in_bits, cfg.peft.quant_type, cfg.peft.double_quant) == ("qlora", 4, "nf4", True)
    assert (cfg.lora_r, cfg.lora_alpha, cfg.target_modules, cfg.lr) == (16, 16, "all-linear", 2e-4)
    assert (cfg.train.epochs, cfg.train.per_device_batch_size, cfg.train.grad_accum) == (1, 8, 2)
    assert cfg.train.gradient_checkpointing == "auto"


def test_size_presets_carry_architecture(make_cfg):
    cfg = make_cfg("model=llama31_8b", tiny=False)
    assert (cfg.model.arch.hidden_size, cfg.model.arch.num_layers, cfg.model.arch.vocab_size) == (4096, 32, 128256)


def test_unknown_key_fails_fast_naming_it(tmp_path):
    proc = run_cli("lora_rr=8", f"tracking_uri=sqlite:///{tmp_path}/m.db", timeout=120)
    assert proc.returncode != 0
    assert "lora_rr" in proc.stderr + proc.stdout
    assert "Loading weights" not in proc.stderr + proc.stdout


def test_wrong_type_fails_naming_key(tmp_path, in_process):
    proc = in_process("ftlab", "lora_r=sixteen")
    assert proc.returncode != 0
    assert "lora_r" in proc.stderr + proc.stdout


BAD_VALUES = ["train.sampling=bogus", "registry.merge_dtype=fp8", "registry.merge_base=nf4", "model.dtype=bf16", "peft.adapter_dtype=int8", "budget.fit=shrink", "lr=-1",
              "lora_alpha=0", "lora_dropout=1.0", "train.grad_accum=0", "train.max_steps=0", "eval.max_examples=0",
              "eval.samples_to_log=-1", "eval.max_new_tokens=0", "registry.gate_metric=rougeL",
              "data.eval_size=2.5", "data.eval_size=0", "peft.quant_type=int4", "model.source=hubb",
              "model.arch.num_heads=0", "model.arch.num_kv_heads=3", "peft.method=full",
              "model.attn_implementation=flash_attention_2", "train.callbacks=[{_target_: foo.Bar}]"]


@pytest.mark.parametrize("override", BAD_VALUES)
def test_a_value_out_of_its_choices_or_range_fails_naming_the_key_before_anything_is_logged(make_cfg, tmp_path,
                                                                                          override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"^{key}="):
        run(make_cfg(f"tracking_uri=sqlite:///{tmp_path}/fresh/mlflow.db", override))
    assert not (tmp_path / "fresh").exists()  # no store, no run: nothing half-logged


@pytest.mark.parametrize("preset", ["model=smollm2_135m", "model=tiny", "model=llama32_1b", "model=llama31_70b",
                                    "peft=lora", "peft=full"])
def test_every_shipped_config_passes_the_check(make_cfg, preset):
    config.check(make_cfg(preset, tiny=False))


@pytest.mark.parametrize("override, says", [("model.name_or_path=/models/my-lama",  # model=tiny: it was ignored
                                             "model.name_or_path=/models/my-lama: model=tiny builds a small random"),
                                            ("seed=-1", "seed=-1: must be in [0, 2**32)"),
                                            ("seed=4294967296", "seed=4294967296: must be in [0, 2**32)"),
                                            ("data.num_records=0", "data.num_records=0: must be >= 1"),
                                            # trained to NaN weights, which the registry's merge check passed
                                            ("lr=inf", "lr=inf: must be a finite number, > 0"),
                                            # a transformers ValueError once the model had loaded
                                            ("model.attn_implementation=bogus",
                                             "model.attn_implementation='bogus': use one of auto, eager, "),
                                            # an unset shell variable: the embedded demo data was trained on
                                            ("data.path=", "data.path='': empty; name one, or leave data.path unset"),
                                            ("experiment=", "experiment='': empty; name one"),
                                            # found only once training had ended
                                            ("eval.bertscore_model=/nonexistent",
                                             "eval.bertscore_model=/nonexistent: no such model directory"),
                                            ("eval.bertscore_num_layers=12", "eval.bertscore_num_layers=12: the "
                                             "BERTScore model (auto) has 6 layers; use 0 to 6"),
                                            ("eval.bertscore_num_layers=-1", "eval.bertscore_num_layers=-1: must be >= 0")])
def test_a_value_out_of_range_is_named_before_anything_loads(make_cfg, override, says):
    with pytest.raises(ConfigError, match=re.escape(says)):
        config.check(make_cfg(override))


@pytest.mark.parametrize("attention", ["sdpa", "flex_attention", "flash_attention_3", "paged|eager",
                                       "kernels-community/flash-attn"])
def test_attention_kernels_transformers_knows_or_loads_from_the_hub_pass_the_check(make_cfg, attention):
    config.check(make_cfg(f"model.attn_implementation='{attention}'"))


@pytest.mark.parametrize("override, says", [("train.sampling=bogus", "train.sampling='bogus': use one of"),
                                            ("train.resume=true", "train.resume: nothing to resume from"),
                                            ("tracking_uri=http://127.0.0.1:9", "cannot use the MLflow tracking store"),
                                            ("target_modules=[]", "target_modules=[] names no module"),
                                            ("output_dir=/proc/ftlab-runs",
                                             "output_dir=/proc/ftlab-runs: cannot make a directory there"),
                                            ("cache_dir=/proc/ftlab-cache",
                                             "cache_dir=/proc/ftlab-cache: cannot make a directory there"),
                                            ("data.rejects=/proc", "data.rejects=/proc: that is a directory"),
                                            ("data.rejects=/proc/ftlab/rejects.jsonl",
                                             "data.rejects=/proc/ftlab/rejects.jsonl: cannot make its directory"),
                                            ("model.attn_implementation=bogus",
                                             "model.attn_implementation='bogus': use one of"),
                                            ("data.path=", "data.path='': empty")])
def test_a_config_error_is_one_line_and_exit_2_from_the_command_line(tmp_path, override, says, in_process):
    proc = in_process("ftlab", "model=tiny", f"tracking_uri=sqlite:///{tmp_path}/m.db", override)  # the last wins
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"ftlab: {says}" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("override", ["train.optim=adamw_bogus", "train.lr_scheduler=cosine_bogus"])
def test_a_trainer_name_transformers_does_not_know_fails_naming_the_key_before_a_run_starts(make_cfg, override):
    key, value = override.split("=")
    # Over budget too (below the CUDA context): the typo is what is said, not a skipped run recorded with it.
    for cfg in (make_cfg(override), make_cfg(override, "budget.vram_gb=0.3")):
        with pytest.raises(ConfigError, match=rf"^{key}='{value}': use one of "):
            run(cfg)
        store = MlflowClient(cfg.tracking_uri)
        assert (experiment := store.get_experiment_by_name(cfg.experiment)) is None or \
            not store.search_runs([experiment.experiment_id])


@pytest.mark.parametrize("scheduler, needs", [("cosine_with_min_lr", "min_lr in lr_scheduler_kwargs"),
                                               ("reduce_lr_on_plateau", "an evaluation during training"),
                                               ("greedy", "an evaluation during training")])
def test_a_scheduler_ftlab_cannot_run_fails_naming_the_key_before_a_run_starts(make_cfg, scheduler, needs):
    """Names transformers knows, that failed with a traceback once the model had loaded and the base was scored."""
    cfg = make_cfg(f"train.lr_scheduler={scheduler}")
    with pytest.raises(ConfigError, match=rf"^train.lr_scheduler='{scheduler}': needs {needs}.*; use one of linear, "):
        run(cfg)
    assert scheduler not in str(config.trainer_choice_problem(make_cfg("train.lr_scheduler=bogus").train))


def test_a_trainer_name_is_checked_without_importing_the_model_stack():
    """train.optim=paged_adamw_8bit imported transformers' trainer modules to check the name: peft and
    bitsandbytes (which looked for a kernel on the hub) came with them, and an over-budget rejection
    took 16 s instead of 6."""
    script = ("import sys; from omegaconf import OmegaConf; from ftlab.config import trainer_choice_problem; "
              "ok = OmegaConf.create({'lr_scheduler': 'cosine', 'optim': 'paged_adamw_8bit'}); "
              "bad = OmegaConf.create({'lr_scheduler': 'cosine', 'optim': 'adamw_bogus'}); "
              "print(trainer_choice_problem(ok), [m for m in ('transformers.trainer_utils', 'peft', 'bitsandbytes') "
              "if m in sys.modules], trainer_choice_problem(bad)[:50])")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "None [] train.optim='adamw_bogus': use one of adamw_torch,", out.stderr[-2000:]


def test_an_installed_wheel_finds_its_configs_and_sweeps_from_any_directory(tmp_path):
    """conf/ and sweeps/ sit at the repository root; the wheel carries them inside the package."""
    def ok(*cmd, cwd=tmp_path):
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    # Built from a copy (links kept): an in-tree build would leave build/ in the repository.
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", "mlruns", "outputs", "multirun", "build", "*.egg-info", "__pycache__", ".pytest_cache"))
    ok(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "wheel"),
       str(source))
    ok(sys.executable, "-m", "venv", "--system-site-packages", str(tmp_path / "venv"))  # the dependencies: this env's
    python = str(tmp_path / "venv" / "bin" / "python")
    ok(python, "-m", "pip", "install", "-q", "--no-deps", *map(str, (tmp_path / "wheel").glob("ftlab-*.whl")))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert ok(python, "-c", "import ftlab; print(ftlab.__file__)", cwd=elsewhere).startswith(str(tmp_path / "venv"))
    out = ok(python, "-m", "ftlab.memory", "model=llama31_8b", "sweeps=rank_lr", cwd=elsewhere)
    assert "predicted peak" in out


@pytest.mark.parametrize("command, says", [
    ("ftlab.registry", "ftlab: say what to do: python -m ftlab.registry register run_id=<run id> | promote"),
    ("ftlab.serve", "ftlab: model is required: add model=... to the command")])
def test_a_command_without_what_it_needs_says_so_in_one_line(tmp_path, command, says, in_process):
    out = in_process(command, cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    [line] = out.stderr.strip().splitlines()
    assert line.startswith(says)


@pytest.mark.parametrize("command, added, says", [
    ("ftlab model=tiny", "+lora_rr=8", "lora_rr is not an ftlab setting, so nothing would read it; did you mean lora_r?"),
    ("ftlab.memory", "+model.arch.head_size=64", "model.arch.head_size is not an ftlab setting"),
    ("ftlab.registry promote", "+forse=true", "forse is not an ftlab setting, so nothing would read it; did you mean force?"),
    ("ftlab.report", "+sweeep=1", "sweeep is not an ftlab setting, so nothing would read it; did you mean sweep?"),
    ("ftlab.serve model=x", "+prot=9000", "prot is not an ftlab setting, so nothing would read it; did you mean port?")])
def test_a_key_added_with_plus_that_nothing_reads_is_refused_in_one_line(tmp_path, command, added, says, in_process):
    """Hydra's own hint for a misspelt key is `+key=value`, which it accepts into any config."""
    module, *args = command.split()
    out = in_process(module, *args, added, cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    [line] = out.stderr.strip().splitlines()
    assert line.startswith(f"ftlab: {says}")
    assert not (tmp_path / "mlruns").exists()  # refused before a store or run was made


@pytest.mark.parametrize("command, usage", [
    ("ftlab", "python -m ftlab -m lora_r=8,16,64"),
    ("ftlab.memory", "python -m ftlab.memory"),
    ("ftlab.registry", "python -m ftlab.registry promote version=<n>"),
    ("ftlab.report", "python -m ftlab.report [sweep=<"),
    ("ftlab.serve", "python -m ftlab.serve model=models:/ftlab@production")])
def test_help_says_what_the_command_does_and_how_to_call_it(tmp_path, command, usage, in_process):
    (tmp_path / "sweeps").mkdir()  # a team's own search space, in the working directory
    (tmp_path / "sweeps" / "team_space.yaml").write_text("# @package _global_\n")
    out = in_process(command, "--help", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("ftlab") and "powered by Hydra" not in out.stdout
    assert usage in out.stdout
    groups = out.stdout.split("== Configuration groups ==")[1].split("== Config ==")[0] if command in (
        "ftlab", "ftlab.memory") else None
    if groups is None:  # a command with no groups to choose does not show the run's (model: tiny, ...)
        assert "Configuration groups" not in out.stdout and "peft:" not in out.stdout
    else:  # conf/serve/ is the serve command's config, not a group: `serve=config` would be refused
        assert "model: llama31_70b, llama31_8b, llama32_1b, llama32_3b, smollm2_135m, tiny" in groups
        assert "serve" not in groups
        assert "sweeps: rank_lr, targets, team_space" in groups
