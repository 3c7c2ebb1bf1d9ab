"""The JSON config cache: the best config per TuneKey, written atomically under a file lock.

File format (the user's cache, the shipped defaults and exports all use it):

    {"format": "mixforge-tuned-configs", "version": 1,
     "entries": {"<str(TuneKey)>": {"key": {...TuneKey fields...},
                                     "config": {...KernelConfig fields...},
                                     "time_ms": 0.41, "baseline_ms": 0.52,
                                     "mixer_name": "gla", "shape": [B, T, H, K, V],
                                     "trials": {"target": 40, "complete": 37, "failed": 2, "rejected": 1},
                                     "study": "...", "torch": "2.11.0", "created": "2025-..."}}}

Only JSON is ever read: nothing is executed or unpickled. A file that does not
parse, or is not in this format, is reported (a warning naming the file) and
ignored; entries that fail the schema are reported and skipped. Writes go to a
temporary file in the same folder, then `os.replace` over the old one, all
under `<file>.lock`; a crash mid-write leaves the old file intact.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Optional

from filelock import FileLock

from mixforge.codegen.config import STRATEGIES, KernelConfig

from .keys import TuneKey, tuner_dir

FORMAT = "mixforge-tuned-configs"
VERSION = 1
LOCK_TIMEOUT_S = 60


class CacheWarning(UserWarning):
    """A cache file was corrupt or foreign and has been ignored."""


class CacheFormatError(ValueError):
    """A file or an entry is not a valid tuned-config cache."""


def default_path() -> Path:
    return tuner_dir() / "configs.json"


# --------------------------------------------------------------------------- validation

def validate_entry(name: str, entry: Any) -> dict:
    """The entry, normalized; raises CacheFormatError naming what is wrong."""
    if not isinstance(entry, dict):
        raise CacheFormatError(f"entry {name!r} is not an object")
    try:
        key = TuneKey.from_dict(entry.get("key"))
    except (ValueError, TypeError) as e:
        raise CacheFormatError(f"entry {name!r}: {e}") from None
    if str(key) != name:
        raise CacheFormatError(f"entry {name!r}: its key fields spell {str(key)!r}")
    cfg = entry.get("config")
    if not isinstance(cfg, dict):
        raise CacheFormatError(f"entry {name!r}: config must be an object")
    try:
        config = KernelConfig.from_dict(cfg)
    except (ValueError, TypeError) as e:
        raise CacheFormatError(f"entry {name!r}: config: {e}") from None
    for f in ("chunk", "sub_chunk", "BV", "num_warps", "num_stages"):
        v = getattr(config, f)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise CacheFormatError(f"entry {name!r}: config.{f} must be a positive integer, got {v!r}")
    if config.BK is not None and (isinstance(config.BK, bool) or not isinstance(config.BK, int) or config.BK < 1):
        raise CacheFormatError(f"entry {name!r}: config.BK must be null or a positive integer")
    if config.strategy not in STRATEGIES:
        raise CacheFormatError(f"entry {name!r}: config.strategy {config.strategy!r} is unknown")
    t = entry.get("time_ms")
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
        raise CacheFormatError(f"entry {name!r}: time_ms must be a positive number")
    b = entry.get("baseline_ms")
    if b is not None and (isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b) or b <= 0):
        raise CacheFormatError(f"entry {name!r}: baseline_ms must be null or a positive number")
    trials = entry.get("trials", {})
    if not isinstance(trials, dict) or not all(isinstance(v, int) and not isinstance(v, bool) for v in trials.values()):
        raise CacheFormatError(f"entry {name!r}: trials must map names to integers")
    for f in ("mixer_name", "study", "torch", "created"):
        if f in entry and entry[f] is not None and not isinstance(entry[f], str):
            raise CacheFormatError(f"entry {name!r}: {f} must be a string")
    shape = entry.get("shape")
    if shape is not None and (not isinstance(shape, list) or len(shape) != 5 or
                              not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in shape)):
        raise CacheFormatError(f"entry {name!r}: shape must be [B, T, H, K, V]")
    out = dict(entry)
    out["config"] = config.to_dict()
    return out


def parse_document(text: str, source: str = "<text>") -> tuple[dict[str, dict], list[str]]:
    """(valid entries, problems) from a file's text; raises CacheFormatError if the file is not a cache at all."""
    try:
        doc = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheFormatError(f"{source} is not valid JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CacheFormatError(f"{source} is not a mixforge tuned-config file (no \"format\": \"{FORMAT}\")")
    if doc.get("version") != VERSION:
        raise CacheFormatError(f"{source} has version {doc.get('version')!r}; this mixforge reads version {VERSION}")
    entries = doc.get("entries")
    if not isinstance(entries, dict):
        raise CacheFormatError(f"{source}: entries must be an object")
    good, problems = {}, []
    for name, entry in entries.items():
        try:
            good[name] = validate_entry(name, entry)
        except CacheFormatError as e:
            problems.append(str(e))
    return good, problems


def document(entries: dict[str, dict]) -> dict:
    return {"format": FORMAT, "version": VERSION, "entries": dict(sorted(entries.items()))}


# --------------------------------------------------------------------------- the file

class ConfigCache:
    """One cache file. Reads never fail (bad content is reported and ignored); writes are atomic."""

    def __init__(self, path: Optional[os.PathLike] = None, *, readonly: bool = False):
        self.path = Path(path) if path is not None else default_path()
        self.readonly = readonly
        self._mtime: Optional[int] = None
        self._entries: dict[str, dict] = {}

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

    def _lock(self) -> FileLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.lock_path), timeout=LOCK_TIMEOUT_S)

    def _read(self, warn: bool = True) -> tuple[dict[str, dict], bool]:
        """(entries, corrupt) from disk; corrupt files and bad entries are reported once per change."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}, False
        except (OSError, UnicodeDecodeError) as e:
            if warn:
                warnings.warn(f"mixforge: cannot read the tuned-config cache {self.path}: {e}; ignoring it",
                              CacheWarning, stacklevel=3)
            return {}, True
        try:
            entries, problems = parse_document(text, str(self.path))
        except CacheFormatError as e:
            if warn:
                warnings.warn(f"mixforge: ignoring the tuned-config cache {self.path}: {e}", CacheWarning,
                              stacklevel=3)
            return {}, True
        if problems and warn:
            warnings.warn(f"mixforge: {self.path}: skipped {len(problems)} invalid entries: " + "; ".join(problems[:3]),
                          CacheWarning, stacklevel=3)
        return entries, False

    def entries(self) -> dict[str, dict]:
        """The valid entries (re-read when the file changed)."""
        try:
            mtime = self.path.stat().st_mtime_ns
        except OSError:
            mtime = None
        if mtime != self._mtime or mtime is None:
            self._entries, _ = self._read()
            self._mtime = mtime
        return self._entries

    def get(self, key: TuneKey | str) -> Optional[dict]:
        return self.entries().get(str(key))

    def _write(self, entries: dict[str, dict]) -> None:
        """Replace the file with `entries`: temp file in the same folder, fsync, os.replace. Caller holds the lock."""
        if self.readonly:
            raise PermissionError(f"{self.path} is read-only (shipped defaults)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".tmp", dir=str(self.path.parent))
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(document(entries), f, indent=1, sort_keys=False)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        self._mtime = None

    def _load_for_update(self) -> dict[str, dict]:
        entries, corrupt = self._read()
        if corrupt and self.path.exists():
            aside = self.path.with_name(f"{self.path.name}.corrupt-{_dt.datetime.now():%Y%m%d-%H%M%S}")
            os.replace(self.path, aside)
            warnings.warn(f"mixforge: moved the unreadable cache {self.path} aside to {aside}", CacheWarning,
                          stacklevel=3)
        return entries

    def update(self, new: dict[str, dict]) -> dict[str, str]:
        """Validate and merge entries (same key: replaced). Returns {key: 'added'|'replaced'|'unchanged'}."""
        checked = {name: validate_entry(name, e) for name, e in new.items()}
        with self._lock():
            entries = self._load_for_update()
            what = {}
            for name, e in checked.items():
                what[name] = "unchanged" if entries.get(name) == e else ("replaced" if name in entries else "added")
                entries[name] = e
            if any(v != "unchanged" for v in what.values()):
                self._write(entries)
        return what

    def put(self, key: TuneKey, config: KernelConfig, time_ms: float, **info) -> dict:
        entry = {"key": key.to_dict(), "config": config.to_dict(), "time_ms": float(time_ms),
                 "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **info}
        self.update({str(key): entry})
        return entry

    def remove(self, names) -> int:
        with self._lock():
            entries = self._load_for_update()
            n = sum(entries.pop(name, None) is not None for name in list(names))
            if n:
                self._write(entries)
        return n

    def clear(self) -> int:
        with self._lock():
            entries, _ = self._read(warn=False)
            if self.path.exists():
                self.path.unlink()
            self._mtime = None
        return len(entries)

    def export(self, dest: os.PathLike) -> int:
        entries = self.entries()
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        ConfigCache(dest)._write_locked(entries)
        return len(entries)

    def _write_locked(self, entries: dict[str, dict]) -> None:
        with self._lock():
            self._write(entries)

    def import_file(self, src: os.PathLike) -> dict[str, str]:
        """Merge another cache file; a foreign or corrupt file, or any invalid entry, rejects the whole import."""
        src = Path(src)
        try:
            text = src.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise CacheFormatError(f"cannot read {src}: {e}") from None
        entries, problems = parse_document(text, str(src))
        if problems:
            raise CacheFormatError(f"{src}: {len(problems)} invalid entries, nothing imported: " + "; ".join(problems[:5]))
        return self.update(entries)


def find(entries: dict[str, dict], query: str) -> list[str]:
    """Keys equal to `query`, else keys that start with it, else keys that contain it."""
    if query in entries:
        return [query]
    pre = [k for k in entries if k.startswith(query)]
    return pre or [k for k in entries if query in k]
