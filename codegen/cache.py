"""The on-disk cache of generated modules.

Triton reads a kernel's source through `inspect`, so a generated module must
live in a real file. Files go under `platformdirs.user_cache_dir("mixforge")
/kernels` (the environment variable MIXFORGE_CACHE_DIR replaces the root),
one per source: `<mixer>_<sha256 of the source, 16 hex>.py`. A file is
written to a temporary name and renamed into place (atomic on POSIX and
Windows) under a file lock, so concurrent processes never see half a file;
a second process finds the file and imports it as is.

A file whose content does not hash to its name (truncated, edited, foreign)
is never imported: it is reported with a warning and written again.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import sys
import tempfile
import warnings
from pathlib import Path
from types import ModuleType

import filelock
import platformdirs

HASH_CHARS = 16


class CorruptCacheWarning(UserWarning):
    """A cached module did not match its hash; it was regenerated."""


def cache_root() -> Path:
    root = os.environ.get("MIXFORGE_CACHE_DIR")
    return Path(root) if root else Path(platformdirs.user_cache_dir("mixforge"))


def kernels_dir() -> Path:
    return cache_root() / "kernels"


def source_hash(source: str) -> str:
    return hashlib.sha256(source.encode("utf-8")).hexdigest()[:HASH_CHARS]


def module_path(name: str, source: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_]", "_", name)
    return kernels_dir() / f"{safe}_{source_hash(source)}.py"


def _intact(path: Path) -> bool:
    """Whether the file's content hashes to the hash in its name."""
    try:
        data = path.read_bytes()
    except OSError:
        return False
    return hashlib.sha256(data).hexdigest()[:HASH_CHARS] == path.stem.rsplit("_", 1)[-1]


def write_module(name: str, source: str) -> tuple[Path, bool]:
    """The module's file, written if missing or corrupt. Returns (path, whether an intact file was found)."""
    path = module_path(name, source)
    if path.is_file() and _intact(path):
        return path, True
    path.parent.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(str(path) + ".lock"):
        if path.is_file():
            if _intact(path):       # another process wrote it while we waited
                return path, True
            warnings.warn(f"mixforge: the cached kernel module {path} does not match its hash "
                          "(truncated or edited); it is ignored and generated again", CorruptCacheWarning,
                          stacklevel=3)
        fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
                f.write(source)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return path, False


def load_module(name: str, source: str) -> tuple[ModuleType, Path, bool]:
    """Import the generated module (writing it first when needed): (module, path, cache hit)."""
    path, hit = write_module(name, source)
    mod_name = f"mixforge_generated_{path.stem}"
    module = sys.modules.get(mod_name)
    if module is None or getattr(module, "__file__", None) != str(path):
        spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[mod_name]
            raise
    return module, path, hit
