"""What every benchmark result file starts with, and where it goes."""
from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

import torch


def header(gpu: bool) -> dict:
    """torch and the date, plus the device and Triton when the run is on a GPU."""
    info = {"torch": torch.__version__, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    if gpu:
        import triton
        info.update(device=torch.cuda.get_device_name(), triton=triton.__version__)
    return info


def stamped(out: str, prefix: str) -> Path:
    """out/prefix-<local time>.json, out created if missing."""
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    return d / f"{prefix}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"


class Results:
    """A benchmark's result file, out/prefix-<stamp>.json: the header (`header`) and `info`, then the rows. It is
    rewritten after every row, so that a run cut short by its time limit keeps what it measured."""

    def __init__(self, out: str, prefix: str, gpu: bool, **info):
        self.path = stamped(out, prefix)
        self.info = {**info, **header(gpu)}
        self.rows: list[dict] = []

    def add(self, row: dict, hide: tuple = ()) -> None:
        """Keep `row`, print it (without the `hide` keys: long profiles) and rewrite the file."""
        self.rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in hide}), flush=True)
        self.save()

    def save(self) -> None:
        self.path.write_text(json.dumps({**self.info, "rows": self.rows}, indent=1))


def timer(smoke: bool):
    """A benchmark's timing function, fn -> ms: compare.bench's median on the GPU; with --smoke (the CPU
    interpreter, tiny shapes) one wall-clock run, so that every step runs without pretending to time."""
    if not smoke:
        from benchmarks.compare import bench
        return bench

    def once(fn) -> float:
        import time
        t = time.time()
        fn()
        return (time.time() - t) * 1e3
    return once
