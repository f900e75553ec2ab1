"""evaluate metric modules shipped with ftlab, loaded by path so nothing comes from the hub."""
import functools
from pathlib import Path

METRICS_DIR = Path(__file__).parent


@functools.cache  # one module per process: a sweep's trials reuse it (and BERTScore its model)
def load(name: str):
    import evaluate

    return evaluate.load(str(METRICS_DIR / name))
