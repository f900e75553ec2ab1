"""The schema: overrides users type, and errors that name the bad key before any model loads."""
from tests.conftest import run_cli


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


def test_wrong_type_fails_naming_key(tmp_path):
    proc = run_cli("lora_r=sixteen", timeout=120)
    assert proc.returncode != 0
    assert "lora_r" in proc.stderr + proc.stdout
