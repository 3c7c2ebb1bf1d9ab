"""What a tuned config is for: the device, the software, the mixer, the kernel and a coarse shape.

A tuned config is only trusted where it was measured. The key holds

* the GPU (name and compute capability) and the Triton version,
* the source it was measured with: a hash of the kernel family's templates,
* the mixer's content hash and the kernel ("chunk_fwd", ...),
* dtype, K and V exactly,
* T and B*H in coarse buckets (powers of 4), so dynamic shapes never retune.

The same fields name the Optuna study (plus a hash of the search space, so a
changed space starts a fresh study instead of clashing with old distributions).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import re
from pathlib import Path
from typing import Optional

import platformdirs

DTYPES = ("fp32", "fp16", "bf16")
_DTYPE_ALIASES = {
    "fp32": "fp32", "float32": "fp32", "float": "fp32", "f32": "fp32",
    "fp16": "fp16", "float16": "fp16", "half": "fp16", "f16": "fp16",
    "bf16": "bf16", "bfloat16": "bf16",
}
BUCKET_BASE = 4
INTERPRETER_DEVICE = "triton-interpreter"


def dtype_name(dtype) -> str:
    """'fp32' | 'fp16' | 'bf16' from a torch dtype or any common spelling ('bfloat16', 'torch.float16')."""
    text = str(dtype).lower()
    if text.startswith("torch."):
        text = text[len("torch."):]
    if text not in _DTYPE_ALIASES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of fp32, fp16, bf16 (or float32, float16, bfloat16)")
    return _DTYPE_ALIASES[text]


def torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype_name(name)]


def bucket(n: int, base: int = BUCKET_BASE) -> int:
    """The smallest power of `base` that is >= n (1 for n <= 1): T=3000 and T=4096 share 4096."""
    n = int(n)
    b = 1
    while b < n:
        b *= base
    return b


# --------------------------------------------------------------------------- environment

def cache_root() -> Path:
    """The user cache root: $MIXFORGE_CACHE_DIR, else platformdirs' user cache dir for mixforge."""
    env = os.environ.get("MIXFORGE_CACHE_DIR")
    return Path(env) if env else Path(platformdirs.user_cache_dir("mixforge"))


def tuner_dir() -> Path:
    return cache_root() / "tuner"


def interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclasses.dataclass(frozen=True)
class DeviceId:
    name: str    # torch.cuda.get_device_name(), or "triton-interpreter"
    cc: str      # compute capability "9.0", or "cpu"

    @property
    def arch(self) -> str:
        """'sm9.0' for a GPU, 'cpu' for the interpreter."""
        return f"sm{self.cc}" if self.cc[:1].isdigit() else self.cc

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9.]+", "-", self.name).strip("-") + f"-{self.arch}"


def current_device(device=None) -> DeviceId:
    """The GPU the kernels run on; the interpreter when TRITON_INTERPRET=1 or no CUDA device exists."""
    import torch

    if interpret_mode() or not torch.cuda.is_available():
        return DeviceId(INTERPRETER_DEVICE, "cpu")
    idx = torch.device(device).index if device is not None and torch.device(device).type == "cuda" else None
    idx = torch.cuda.current_device() if idx is None else idx
    major, minor = torch.cuda.get_device_capability(idx)
    return DeviceId(torch.cuda.get_device_name(idx), f"{major}.{minor}")


def triton_version() -> str:
    import triton

    return triton.__version__


#: the templates each kernel family is rendered from (its tuned configs depend on these only)
FAMILY_TEMPLATES = {
    "chunk": ("chunk.py.jinja", "chunk_macros.jinja", "_maps.jinja"),
    "recurrent": ("recurrent.py.jinja", "_recurrent.jinja", "step.py.jinja", "_maps.jinja"),
}


def family(kernel: Optional[str]) -> Optional[str]:
    if kernel is None:
        return None
    return "chunk" if kernel.startswith("chunk") else "recurrent"


@functools.lru_cache(maxsize=8)
def source_hash(kernel: Optional[str] = None) -> str:
    """Hash of the kernel sources a tuned config depends on.

    The templates of the kernel's family (chunk: chunk.py.jinja, chunk_macros.jinja,
    _maps.jinja; recurrent and step: recurrent.py.jinja, _recurrent.jinja,
    step.py.jinja, _maps.jinja), so editing one family's templates does not
    orphan the other's configs. Without a kernel: every templates/*.jinja.
    """
    fam = family(kernel)
    return templates_hash(FAMILY_TEMPLATES[fam] if fam else None)


def templates_hash(names=None) -> str:
    d = hashlib.sha256()
    folder = templates_dir()
    paths = sorted(folder.glob("*.jinja")) if names is None else [folder / n for n in sorted(names)]
    for path in paths:
        data = path.read_bytes() if path.exists() else b"<missing>"
        d.update(path.name.encode() + b"\0" + data + b"\0")
    return d.hexdigest()[:12]


def templates_dir() -> Path:
    try:
        from mixforge.codegen.render import templates_dir as codegen_templates

        return codegen_templates()
    except Exception:  # codegen without a renderer: the installed package data
        return Path(__file__).resolve().parent.parent / "templates"


# --------------------------------------------------------------------------- the key

@dataclasses.dataclass(frozen=True)
class TuneKey:
    """One tuned config's identity. `str(key)` is the cache file's key; `study_name` names the study."""

    device: str
    cc: str
    triton: str
    source: str
    mixer: str        # Mixer.content_hash
    kernel: str
    dtype: str
    K: int
    V: int
    T_bucket: int
    BH_bucket: int

    FIELDS = ("device", "cc", "triton", "source", "mixer", "kernel", "dtype", "K", "V", "T_bucket", "BH_bucket")

    def __str__(self) -> str:
        return (f"{self.device}|{DeviceId(self.device, self.cc).arch}|triton-{self.triton}|src-{self.source}|{self.mixer}|{self.kernel}|"
                f"{self.dtype}|K{self.K}|V{self.V}|T<={self.T_bucket}|BH<={self.BH_bucket}")

    @property
    def bucket_text(self) -> str:
        return f"K{self.K} V{self.V} T<={self.T_bucket} BH<={self.BH_bucket}"

    def to_dict(self) -> dict:
        return {f: getattr(self, f) for f in self.FIELDS}

    @classmethod
    def from_dict(cls, d: dict) -> "TuneKey":
        if not isinstance(d, dict):
            raise ValueError("key must be an object")
        missing = [f for f in cls.FIELDS if f not in d]
        if missing:
            raise ValueError(f"key lacks {missing}")
        extra = set(d) - set(cls.FIELDS)
        if extra:
            raise ValueError(f"key has unknown fields {sorted(extra)}")
        for f in ("device", "cc", "triton", "source", "mixer", "kernel", "dtype"):
            if not isinstance(d[f], str) or not d[f]:
                raise ValueError(f"key field {f} must be a non-empty string")
        for f in ("K", "V", "T_bucket", "BH_bucket"):
            if isinstance(d[f], bool) or not isinstance(d[f], int) or d[f] < 1:
                raise ValueError(f"key field {f} must be a positive integer")
        if d["dtype"] not in DTYPES:
            raise ValueError(f"key dtype {d['dtype']!r} is not one of {DTYPES}")
        return cls(**d)

    def hard(self) -> tuple:
        """The fields that must match exactly for a config to be used at all.

        Not the source: a template edit (a rounding fix, a comment) leaves the tile configs valid, and
        they are checked against the current search space before use; the nearest-bucket lookup prefers
        the same source and falls back to a config tuned on an earlier one over the untuned heuristic."""
        return (self.device, self.cc, self.mixer, self.kernel, self.dtype, self.K, self.V)

    def study_name(self, space_hash: str) -> str:
        return (f"mixforge/{self.mixer}/{self.kernel}/{DeviceId(self.device, self.cc).slug}/triton-{self.triton}/"
                f"src-{self.source}/{self.dtype}/K{self.K}-V{self.V}-T{self.T_bucket}-BH{self.BH_bucket}/"
                f"space-{space_hash}")


def make_key(mixer_hash: str, kernel: str, dtype, B: int, T: int, H: int, K: int, V: int, *,
             device: Optional[DeviceId] = None, triton: Optional[str] = None, source: Optional[str] = None) -> TuneKey:
    dev = device or current_device()
    return TuneKey(device=dev.name, cc=dev.cc, triton=triton or triton_version(), source=source or source_hash(kernel),
                   mixer=mixer_hash, kernel=kernel, dtype=dtype_name(dtype), K=int(K), V=int(V),
                   T_bucket=bucket(T), BH_bucket=bucket(int(B) * int(H)))

