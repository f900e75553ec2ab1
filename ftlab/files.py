"""Files and directories that appear whole or not at all: a sweep's workers share one cache
(the converted base model, generated and prepared data), and several may build the same entry at
once while others read it. And the directories settings name, made before anything loads."""
from __future__ import annotations

import hashlib
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ftlab.config import ConfigError


def weights_fingerprint(checkpoint: Path) -> str:
    """Which weights a checkpoint directory holds, in milliseconds where hashing an 8B's 16 GB takes
    a minute: each weights file's name, size, header and first and last MiB (re-initialised or
    re-trained weights differ there); pickled .bin weights (model.allow_pickle_weights) too."""
    h = hashlib.sha256()
    for file in sorted(p for pattern in ("*.safetensors", "*.bin") for p in Path(checkpoint).glob(pattern)):
        size = file.stat().st_size
        h.update(f"{file.name}:{size}".encode())
        with file.open("rb") as f:
            h.update(f.read(2**20))
            f.seek(max(0, size - 2**20))
            h.update(f.read(2**20))
    return h.hexdigest()[:16]


def make_dir(path: str | Path, key: str) -> Path:
    """A directory a setting names, made now: a file in the way or no permission is a one-line
    error naming the key before anything loads, not a traceback after training."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{key}={path}: cannot make a directory there ({e.strerror})") from None
    return Path(path)


def make_file_dir(path: str | Path, key: str) -> Path:
    """The directory of a file a setting names, made now; a directory named instead of a file is
    refused, as make_dir refuses what cannot be made, before anything loads."""
    file = Path(path).expanduser()
    if file.is_dir():
        raise ConfigError(f"{key}={path}: that is a directory; name a file")
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{key}={path}: cannot make its directory ({e.strerror})") from None
    return file


@contextmanager
def publishing(out: Path, directory: bool = True) -> Iterator[Path]:
    """Yield a staging path beside `out` (a directory, or a file path when directory=False) to
    build it in; when the block ends it moves into place in one step. Whoever moves first wins:
    another worker's finished `out` is kept and this copy removed. On an error nothing is moved."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f"{out.name}.partial"))
    staged = tmp if directory else tmp / out.name
    try:
        yield staged
        try:
            staged.rename(out)  # a file replaces its twin; a directory cannot replace a non-empty one
        except OSError:
            if not out.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
