"""`mixforge demo`: the first thing a new user runs.

It declares a new variant in a few lines, generates its kernels, checks them
(values and gradients, chunked and recurrent, plus decoding) against the
float64 reference, shows where the generated Triton lives, draws the variant's
implicit attention, and prints a summary. On a GPU it also tunes the variant
with a short budget and times it against a zoo mixer. On a CPU the kernels run
under Triton's interpreter (fp32, small shapes): a few minutes on two cores at
most, `--quick` less.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import inspect
import json
import os
import time
from pathlib import Path

import torch

import mixforge as mf
from mixforge import Bonus, Input, Mixer, Param, s, value
from mixforge.functions import logsigmoid, sigmoid, silu

VALUE_TOL = 1e-4      # fp32 kernels vs the float64 reference (ALGORITHMS.md §5)
GRAD_TOL = 1e-3


def declare_variant() -> Mixer:
    """A variant no library ships: GLA's per-key decay, a key tied to it, and a gated bonus."""
    q, a = Input("q"), Input("a")
    v, g = Input("v", dim="value"), Input("g", dim="value")
    decay = logsigmoid(a) / 8
    return Mixer("tied_gla", fq=q, fk=1 - sigmoid(a), fv=v, fa=decay, fg=silu(g), norm="rms",
                 bonus=Bonus(weight=Param("u"), term=sigmoid(s) * value))


def check_parallel_form(mixer: Mixer, seed: int = 0) -> float:
    """max |o_recurrent - (M v + nonlinear bonus)| on random inputs, float64."""
    from mixforge.spec.reference import bonus_term, evaluate_maps, recurrence
    from mixforge.spec.shapes import REFERENCE_DTYPES, resolve_call
    from mixforge.spec.testing import random_inputs

    x = random_inputs(mixer, B=2, T=24, H=2, K=8, V=8, dtype=torch.float64, seed=seed)
    rec = recurrence(mixer, **x)
    M = mf.attention_map(mixer, **x)
    maps = evaluate_maps(mixer, x, resolve_call(mixer, x, dtypes=REFERENCE_DTYPES))
    o = torch.einsum("bhts,bshv->bthv", M, maps.v)
    if mixer.bonus is not None and mixer.bonus.linear_coefficient is None:
        o = o + bonus_term(mixer, maps, x)
    return (o - rec.o).abs().max().item()


# --------------------------------------------------------------------------- kernel checks

def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _state_parts(state):
    return list(state) if isinstance(state, (tuple, list)) else [state]


def check_path(ops, mixer: Mixer, path: str, shape: dict, seed: int = 0, device="cpu") -> dict:
    """Relative errors of one path (chunk or recurrent) against the float64 reference.

    With an initial state and the final state requested; gradients of every
    input, parameter and the initial state for a random output gradient.
    """
    from mixforge.spec.testing import random_inputs

    x = random_inputs(mixer, **shape, dtype=torch.float32, seed=seed, requires_grad=True, device=device)
    N, H, K, V = shape["B"], shape["H"], shape["K"], shape["V"]
    gen = torch.Generator().manual_seed(seed + 1)
    S0 = (0.5 * torch.randn(N, H, K, V, generator=gen)).to(device).requires_grad_(True)
    z0 = torch.rand(N, H, K, generator=gen).to(device).requires_grad_(True)
    init = (S0, z0) if mixer.normalize else S0
    y, S = getattr(ops, path)(initial_state=init, output_final_state=True, **x)
    x64 = {k: v.detach().double().requires_grad_(True) for k, v in x.items()}
    init64 = tuple(p.detach().double().requires_grad_(True) for p in _state_parts(init))
    y_ref, S_ref = mf.reference(mixer, initial_state=init64 if mixer.normalize else init64[0],
                                output_final_state=True, **x64)
    dy = torch.randn(y.shape, generator=gen).to(device)
    dS = [torch.randn(p.shape, generator=gen).to(device) for p in _state_parts(S)]
    outs, refs = [y] + _state_parts(S), [y_ref] + _state_parts(S_ref)
    leaves = list(x.values()) + list(_state_parts(init))
    leaves64 = list(x64.values()) + list(init64)
    grads = torch.autograd.grad(outs, leaves, [dy] + dS, allow_unused=True)
    grads64 = torch.autograd.grad(refs, leaves64, [dy.double()] + [d.double() for d in dS], allow_unused=True)
    names = list(x) + (["S0", "z0"] if mixer.normalize else ["S0"])
    grad_err = {}
    for n, g, r in zip(names, grads, grads64):
        if r is None:
            continue
        grad_err[n] = float("inf") if g is None else _rel(g, r)
    return {
        "y": _rel(y, y_ref),
        "state": max(_rel(a, b) for a, b in zip(_state_parts(S), _state_parts(S_ref))),
        "grads": grad_err,
        "max_grad": max(grad_err.values()) if grad_err else 0.0,
    }


def check_decoding(ops, mixer: Mixer, shape: dict, prefill: int, seed: int = 0, device="cpu") -> float:
    """Prefill with the chunk path, then ops.step token by token: relative error against one pass."""
    from mixforge.spec.testing import random_inputs

    x = random_inputs(mixer, **shape, dtype=torch.float32, seed=seed, device=device)
    inputs = {o.name for o in mixer.inputs}
    y_ref, _ = mf.reference(mixer, **{k: v.double() for k, v in x.items()})
    head = {k: (v[:, :prefill] if k in inputs else v) for k, v in x.items()}
    y0, state = ops.chunk(output_final_state=True, **head)
    ys = [y0]
    for i in range(prefill, shape["T"]):
        step = {k: (v[:, i] if k in inputs else v) for k, v in x.items()}
        yi, state = ops.step(state=state, position=i, **step)
        ys.append(yi[:, None])
    return _rel(torch.cat(ys, 1), y_ref)


def check_layer(ops, mixer: Mixer, quick: bool, device="cpu") -> float:
    """A MixerLayer on the generated kernels: prefill + decoding steps equals one pass."""
    torch.manual_seed(0)
    layer = mf.MixerLayer(mixer, 32, 2, ops=ops).to(device)
    T = 8 if quick else 12
    x = torch.randn(1, T, 32).to(device)
    with torch.no_grad():
        y = layer(x)
        y0, state = layer(x[:, :T - 3], use_cache=True)
        ys = [y0]
        for i in range(T - 3, T):
            yi, state = layer(x[:, i:i + 1], state=state)
            ys.append(yi)
    return _rel(torch.cat(ys, 1), y)


# --------------------------------------------------------------------------- GPU extras

def gpu_benchmark(mixer: Mixer, other: Mixer, shape=(4, 2048, 8, 64, 64), tune_budget_s: float = 60.0,
                  log=print) -> dict:
    """Tune briefly (if mixforge.tune exists), then time both mixers' chunk fwd and fwd+bwd (bf16, medians)."""
    import triton

    from mixforge.spec.testing import random_inputs

    B, T, H, K, V = shape
    out = {"shape": dict(B=B, T=T, H=H, K=K, V=V), "dtype": "bf16", "device": torch.cuda.get_device_name()}
    if hasattr(mf, "tune"):
        t0 = time.perf_counter()
        try:
            report = mf.tune(mixer, shapes=shape, dtype="bf16", trials=8, timeout=tune_budget_s)
            out["tune"] = {"trials": report.trials_run, "cache_hit": report.cache_hit,
                           "seconds": time.perf_counter() - t0}
        except Exception as e:  # tuning is a bonus; the timings below still run
            out["tune"] = {"error": f"{type(e).__name__}: {e}"}
        log(f"tuned {mixer.name}: {out['tune']}")
    rows = {}
    for m in (mixer, other):
        ops = mf.compile(m)                   # uses the configs just tuned
        x = random_inputs(m, B=B, T=T, H=H, K=K, V=V, dtype=torch.bfloat16, device="cuda", seed=0,
                          requires_grad=True)
        def fwd():
            with torch.no_grad():
                return ops.chunk(**x)

        y, _ = fwd()
        dy = torch.randn_like(y)

        def fwd_bwd():
            yy, _ = ops.chunk(**x)
            yy.backward(dy)

        t_fwd = triton.testing.do_bench(fwd, warmup=25, rep=200, return_mode="median")
        t_all = triton.testing.do_bench(fwd_bwd, warmup=25, rep=200, return_mode="median")
        rows[m.name] = {"fwd_ms": t_fwd, "fwd_bwd_ms": t_all}
        log(f"{m.name}: fwd {t_fwd:.3f} ms, fwd+bwd {t_all:.3f} ms")
    out["timings"] = rows
    return out


# --------------------------------------------------------------------------- the demo

def _console():
    from rich.console import Console

    return Console(highlight=False)


def run_demo(out_dir: str = "mixforge-demo", quick: bool = False, console=None) -> int:
    """Declare, generate, check, plot (and on a GPU tune and time). Returns 0 when every check passes."""
    has_gpu = torch.cuda.is_available()
    if not has_gpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")   # before any kernel is created
    from rich.panel import Panel
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    from rich.syntax import Syntax
    from rich.table import Table

    con = console or _console()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    summary: dict = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                     "torch": torch.__version__, "device": torch.cuda.get_device_name() if has_gpu else "cpu",
                     "interpreter": os.environ.get("TRITON_INTERPRET") == "1"}
    ok = True

    con.rule("[bold]mixforge demo")
    con.print("1. Declare a variant in a few lines:")
    src = inspect.getsource(declare_variant)
    con.print(Syntax(src, "python", theme="ansi_dark", line_numbers=False))
    mixer = declare_variant()
    con.print(Panel(mixer.describe(), title=f"the variant: {mixer.name}", expand=False))
    summary["mixer"] = mixer.to_dict()

    device_note = "GPU, fp32 checks" if has_gpu else "CPU (Triton interpreter, fp32)"
    dev = "cuda" if has_gpu else "cpu"
    shape = dict(B=2, T=12 if quick else 20, H=2, K=8, V=12)     # T not a multiple of a chunk; K != V
    steps = ["parallel form", "generate kernels", "chunk vs reference", "recurrent vs reference",
             "decoding", "layer", "attention map"] + (["tune and time"] if has_gpu else [])
    results: dict = {}
    compile_fn = getattr(mf, "compile", None)
    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TimeElapsedColumn(), console=con, transient=False)
    with progress:
        task = progress.add_task(f"checking on {device_note}", total=len(steps))

        def advance(name):
            progress.update(task, advance=1, description=f"{name} ({device_note})")

        def say(msg):
            progress.console.print(msg)

        err = check_parallel_form(mixer)
        results["parallel_form"] = err
        ok &= err < 1e-9
        say(f"  recurrence vs implicit attention map (float64): max |diff| {err:.1e}")
        advance("parallel form")

        ops = None
        if compile_fn is None:
            say("  [yellow]kernels: not yet available[/] (this build has no mixforge.compile)")
            results["kernels"] = "not yet available"
            for name in steps[1:6]:
                advance(name)
        else:
            t0 = time.perf_counter()
            ops = compile_fn(mixer)       # the front door hands it the tuned-config lookup
            import ast

            tree = ast.parse(ops.source())
            kernels = sorted(n.name[:-len("_kernel")] for n in tree.body
                             if isinstance(n, ast.FunctionDef) and n.name.endswith("_kernel"))
            results["kernels"] = kernels
            results["module_path"] = str(ops.module_path)
            say(f"  generated {len(kernels)} kernels in {time.perf_counter() - t0:.1f} s: {', '.join(kernels)}")
            say(f"  generated source: [bold]{ops.module_path}[/]   (ops.source('chunk_fwd') prints one kernel)")
            advance("generate kernels")
            for path in ("chunk", "recurrent"):
                t0 = time.perf_counter()
                with warnings_as_notes(say):
                    r = check_path(ops, mixer, path, shape, device=dev)
                results[path] = r
                good = r["y"] < VALUE_TOL and r["state"] < VALUE_TOL and r["max_grad"] < GRAD_TOL
                ok &= good
                worst = max(r["grads"], key=r["grads"].get) if r["grads"] else "-"
                say(f"  {path:9s}: y {r['y']:.1e}, final state {r['state']:.1e}, gradients max {r['max_grad']:.1e} "
                    f"({worst})  {'[green]ok[/]' if good else '[red]FAILED[/]'}  {time.perf_counter() - t0:.1f} s")
                advance(f"{path} vs reference")
            err = check_decoding(ops, mixer, dict(shape, B=1), prefill=shape["T"] - 4, device=dev)
            results["decoding"] = err
            ok &= err < VALUE_TOL
            say(f"  decoding : prefill {shape['T'] - 4} tokens + 4 steps vs one pass: {err:.1e}  "
                f"{'[green]ok[/]' if err < VALUE_TOL else '[red]FAILED[/]'}")
            advance("decoding")
            err = check_layer(ops, mixer, quick, device=dev)
            results["layer"] = err
            ok &= err < VALUE_TOL
            say(f"  layer    : MixerLayer prefill + decode vs one pass: {err:.1e}  "
                f"{'[green]ok[/]' if err < VALUE_TOL else '[red]FAILED[/]'}")
            advance("layer")

        from mixforge.spec.testing import random_inputs

        x = random_inputs(mixer, B=1, T=48 if quick else 64, H=2, K=8, V=8, dtype=torch.float64, seed=0)
        png = out / f"{mixer.name}_attention.png"
        mf.plot_attention_map(mixer, x, out=png, title=f"{mixer.name}: implicit attention per head (random inputs)")
        results["attention_png"] = str(png)
        say(f"  attention map: [bold]{png}[/]")
        advance("attention map")

        if has_gpu and ops is not None:
            try:
                results["gpu"] = gpu_benchmark(mixer, mf.zoo.gla, tune_budget_s=30 if quick else 60, log=say)
            except Exception as e:
                results["gpu"] = {"error": f"{type(e).__name__}: {e}"}
                say(f"  [red]GPU benchmark failed[/]: {results['gpu']['error']}")
            advance("tune and time")

    table = Table(title=f"{mixer.name}: summary", show_lines=False)
    table.add_column("item", style="bold")
    table.add_column("value")
    for key in ("fq", "fk", "fv", "fa", "fg"):
        table.add_row(key, str(mixer.maps.get(key, "0 (no decay)" if key == "fa" else "1 (no gate)")))
    table.add_row("decay kind", mixer.decay_kind)
    table.add_row("bonus", "none" if mixer.bonus is None else str(mixer.bonus.term))
    k = results.get("kernels")
    table.add_row("kernels", k if isinstance(k, str) else f"{len(k)}: {', '.join(k)}")
    if "module_path" in results:
        table.add_row("generated source", results["module_path"])
    table.add_row("parallel form (fp64)", f"{results['parallel_form']:.1e}")
    for path in ("chunk", "recurrent"):
        if path in results:
            r = results[path]
            table.add_row(f"{path} max rel. error", f"y {r['y']:.1e} | state {r['state']:.1e} | grads {r['max_grad']:.1e}")
    for key, label in (("decoding", "decoding (prefill+steps)"), ("layer", "MixerLayer decode")):
        if key in results:
            table.add_row(label, f"{results[key]:.1e}")
    if "gpu" in results and "timings" in results["gpu"]:
        for name, t in results["gpu"]["timings"].items():
            table.add_row(f"{name} (bf16)", f"fwd {t['fwd_ms']:.3f} ms | fwd+bwd {t['fwd_bwd_ms']:.3f} ms")
    table.add_row("attention map", results["attention_png"])
    con.print(table)
    summary.update(results=results, ok=bool(ok), seconds=time.perf_counter() - t_start)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    con.print(f"{'[green]all checks passed' if ok else '[red]some checks FAILED'}[/]  "
              f"({summary['seconds']:.0f} s; summary in {out / 'summary.json'})")
    return 0 if ok else 1


@contextlib.contextmanager
def warnings_as_notes(say):
    """Show library warnings (such as a path falling back to another) as one line each."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        say(f"  [dim]note: {w.message}[/]")
