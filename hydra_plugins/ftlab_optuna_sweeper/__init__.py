"""ftlab's Optuna sweeper for Hydra 1.3 and Optuna >= 4 (hydra/sweeper=optuna)."""
