"""`mixforge emit`: write a mixer's generated Triton module to a folder, to read or to ship."""
from __future__ import annotations

import ast
from pathlib import Path


def register(subparsers) -> None:
    e = subparsers.add_parser(
        "emit", help="write the generated Triton kernels of a mixer (one readable Python module)",
        description="Render a mixer's kernels (recurrent, chunked, step, epilogue, chain rule) into one "
                    "Python module and write it to DIR/<mixer>.py. Nothing is compiled or run.")
    e.add_argument("spec", help="a zoo name, file.py:NAME or spec.json")
    e.add_argument("--out", required=True, metavar="DIR", help="folder to write to (created if missing)")
    e.add_argument("--kernel", default=None, metavar="NAME",
                   help="print one kernel's source (e.g. recurrent_fwd) to stdout as well")
    e.set_defaults(func=cmd_emit)


def cmd_emit(args) -> int:
    from mixforge.codegen.plan import build_plan
    from mixforge.codegen.render import kernel_source, render_module
    from mixforge.spec import load_mixer

    mixer = load_mixer(args.spec)
    plan = build_plan(mixer)
    source = render_module(plan)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{mixer.name}.py"
    path.write_text(source)
    kernels = [n.name for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name.endswith("_kernel")]
    print(plan.describe())
    print(f"wrote {path} ({len(source.splitlines())} lines): {', '.join(kernels)}")
    if args.kernel:
        try:
            text = kernel_source(source, args.kernel)
        except KeyError as e:
            print(f"mixforge: error: {e.args[0]}")
            return 2
        print()
        print(text, end="")
    return 0
