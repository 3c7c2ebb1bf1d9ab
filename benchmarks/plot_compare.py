"""Plot and tabulate a `benchmarks.compare` result.

    python -m benchmarks.plot_compare benchmarks/results/compare-<stamp>.json [--out compare.png] [--markdown]
    python -m benchmarks.plot_compare EARLIER.json LATER.json ... --out merged.png --markdown

The PNG has one panel per variant (mixer): time against T at K = V = 128
(B*T = 32768, so every point moves the same number of tokens), forward and
forward+backward, ours solid and the peer dashed, with the forward's HBM
roofline floor (inputs read once, output written once, at the copy rate
measured in the same run) drawn in. `--markdown` prints the README table:
every row with both times, the ratio (peer / ours, > 1 means mixforge is
faster), peak memory and the roofline fraction.

Several results merge into one (a run cut by its time limit, completed by a later run of the missing cases):
a row of a later file replaces the same row (mixer, peer, shape, pass) of an earlier one. Each ratio still
comes from one run, where ours and the peer were timed side by side; the table names each row's run.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path


def load(path) -> dict:
    data = json.loads(Path(path).read_text())
    if "rows" not in data:
        raise SystemExit(f"{path}: not a benchmarks.compare result (no 'rows')")
    return data


def _row_key(r: dict) -> tuple:
    return tuple(r.get(k) for k in ("mixer", "peer", "B", "T", "H", "K", "V", "dtype", "pass"))


def merge(paths) -> dict:
    """One result from several, later files first: every row tagged with its file's name (`run`); the
    device, versions and date of the last file, and `runs`, the files in order."""
    rows: dict = {}
    data = {}
    for path in paths:
        data = load(path)
        for r in data["rows"]:
            rows[_row_key(r)] = dict(r, run=Path(path).stem)
    return {**{k: v for k, v in data.items() if k != "rows"}, "runs": [Path(p).stem for p in paths],
            "rows": list(rows.values())}


def plot(data: dict, out, K: int = 128, sdpa_bwd: bool = True) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    series = defaultdict(lambda: defaultdict(dict))     # mixer -> (who, pass) -> T -> ms
    floor = defaultdict(dict)                           # mixer -> T -> roofline ms
    peers = {}
    for r in data["rows"]:
        if r.get("K") != K or r.get("peer") == "torch.sdpa" or "pass" not in r:
            continue
        m = r["mixer"]
        if isinstance(r.get("ms"), (int, float)):
            series[m][("mixforge", r["pass"])][r["T"]] = r["ms"]
        if isinstance(r.get("peer_ms"), (int, float)):
            series[m][("peer", r["pass"])][r["T"]] = r["peer_ms"]
            peers[m] = r.get("peer", "peer")
        if r["pass"] == "fwd" and isinstance(r.get("roofline_ms"), (int, float)):
            floor[m][r["T"]] = r["roofline_ms"]
    sdpa = defaultdict(dict)
    for r in data["rows"]:
        if r.get("K") == K and r.get("peer") == "torch.sdpa" and isinstance(r.get("peer_ms"), (int, float)) \
                and (sdpa_bwd or r.get("pass") != "fwd+bwd"):
            sdpa[r["pass"]][r["T"]] = r["peer_ms"]
    mixers = sorted(series)
    if not mixers:
        raise SystemExit(f"no rows at K = {K} to plot")
    cols = min(4, len(mixers))
    nrows = math.ceil(len(mixers) / cols)
    fig = Figure(figsize=(4.0 * cols, 3.3 * nrows + 0.6), dpi=120)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, cols, squeeze=False)
    colors = {"fwd": "tab:blue", "fwd+bwd": "tab:red"}
    for ax, m in zip(axes.flat, mixers):
        for (who, p), pts in sorted(series[m].items()):
            Ts = sorted(pts)
            label = f"{'mixforge' if who == 'mixforge' else peers.get(m, 'peer')} {p}"
            ax.plot(Ts, [pts[t] for t in Ts], marker="o", ms=3, color=colors[p],
                    linestyle="-" if who == "mixforge" else "--", label=label)
        for p, pts in sdpa.items():
            Ts = sorted(pts)
            ax.plot(Ts, [pts[t] for t in Ts], color=colors[p], alpha=0.35, linestyle=":", label=f"SDPA {p}")
        if floor[m]:
            Ts = sorted(floor[m])
            ax.plot(Ts, [floor[m][t] for t in Ts], color="black", linewidth=1.0, label="fwd HBM roofline")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(m, fontsize=9)
        ax.set_xlabel("T (B*T = 32768)", fontsize=8)
        ax.set_ylabel("ms (median)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(mixers):]:
        ax.set_axis_off()
    fig.suptitle(f"{data.get('device', '?')}, bf16, H = 16, K = V = {K}; torch {data.get('torch')}, "
                 f"Triton {data.get('triton')}, {data.get('date', '')[:10]}"
                 + (f"; rows of {len(data['runs'])} runs" if len(data.get("runs", ())) > 1 else ""), fontsize=9)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, bbox_inches="tight")
    return out


def _fmt(v, f="{:.3f}"):
    return f.format(v) if isinstance(v, (int, float)) else "–"


def markdown(data: dict) -> str:
    runs = len(data.get("runs", ())) > 1      # merged results name each row's run
    lines = ["| mixer | peer | B | T | K | pass | mixforge ms | peer ms | ratio | mem ours / peer (MB) | roofline |"
             + (" run |" if runs else ""),
             "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if runs else "")]
    for r in data["rows"]:
        run = f" {r.get('run', '')} |" if runs else ""
        if "pass" not in r:
            lines.append(f"| {r.get('mixer')} | {r.get('peer', '')} | {r.get('B')} | {r.get('T')} | {r.get('K')} "
                         f"| | error | | | | |{run}")
            continue
        peer_ms = r.get("peer_ms")
        if peer_ms is None:
            why = r.get("peer_error") or r.get("peer_missing") or ""
            peer_ms_txt = "refuses" if "refuse" in why.lower() or "miscompil" in why.lower() else \
                ("missing" if r.get("peer_missing") else "error")
        else:
            peer_ms_txt = _fmt(peer_ms)
        mem = (f"{r['peak_bytes'] / 2**20:.0f} / {r['peer_peak_bytes'] / 2**20:.0f}"
               if isinstance(r.get("peak_bytes"), int) and isinstance(r.get("peer_peak_bytes"), int) else "–")
        ratio = _fmt(r.get("ratio"), "{:.2f}")
        if r.get("agrees") is False:
            ratio += " (outputs differ)"
        lines.append(f"| {r['mixer']} | {r.get('peer', '')} | {r['B']} | {r['T']} | {r['K']} | {r['pass']} | "
                     f"{_fmt(r.get('ms'))} | {peer_ms_txt} | {ratio} | {mem} | "
                     f"{_fmt(r.get('roofline_fraction'), '{:.0%}')} |{run}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.plot_compare", description=__doc__.split("\n\n")[0])
    p.add_argument("result", nargs="+",
                   help="a compare-*.json written by python -m benchmarks.compare; several merge, later ones win")
    p.add_argument("--out", default=None, help="the PNG (default: next to the (last) JSON, .png)")
    p.add_argument("--K", type=int, default=128, help="which K the plot shows (default 128)")
    p.add_argument("--markdown", action="store_true", help="print the README table")
    p.add_argument("--no-sdpa-bwd", action="store_true",
                   help="leave SDPA's fwd+bwd out (runs before the fix of 2026-11-22 timed its forward only)")
    a = p.parse_args(argv)
    data = load(a.result[0]) if len(a.result) == 1 else merge(a.result)
    out = plot(data, a.out or Path(a.result[-1]).with_suffix(".png"), K=a.K, sdpa_bwd=not a.no_sdpa_bwd)
    print(f"wrote {out}")
    if a.markdown:
        print(markdown(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
