"""evaluate metric modules shipped with ftlab, loaded by path so nothing comes from the hub."""
from pathlib import Path

METRICS_DIR = Path(__file__).parent


def load(name: str):
    import evaluate

    return evaluate.load(str(METRICS_DIR / name))
