"""ftlab: LoRA/QLoRA fine-tuning with Hydra configs, Optuna sweeps under a VRAM
budget, MLflow tracking and a model registry with a promotion gate."""
__version__ = "0.1.0"
