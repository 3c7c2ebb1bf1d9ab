"""The `mixforge` command. Each subcommand's work lives in the module it names."""
from __future__ import annotations

import argparse
import sys


def _cmd_show(args) -> int:
    from mixforge.spec import load_mixer

    print(load_mixer(args.spec).describe())
    return 0


def _cmd_demo(args) -> int:
    from mixforge.demo import run_demo

    return run_demo(out_dir=args.out, quick=args.quick)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mixforge", description="Compile declared linear-attention mixers to Triton kernels.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="declare a variant, generate and check its kernels, draw its attention map")
    d.add_argument("--out", default="mixforge-demo", help="folder for the demo's files (default: ./mixforge-demo)")
    d.add_argument("--quick", action="store_true", help="smaller shapes")
    d.set_defaults(func=_cmd_demo)

    s = sub.add_parser("show", help="print a mixer's five maps")
    s.add_argument("spec", help="a zoo name, file.py:NAME or spec.json")
    s.set_defaults(func=_cmd_show)

    for register in _optional_commands():
        register(sub)
    return p


def _optional_commands():
    """Subcommands that live with the layer they drive (codegen, tuner, plots, benchmarks)."""
    import importlib

    for mod in ("mixforge.cli_codegen", "mixforge.cli_tuner", "mixforge.cli_plots", "mixforge.cli_bench"):
        try:
            module = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
            continue
        yield module.register


def main(argv: list[str] | None = None) -> int:
    from mixforge.spec.errors import CallError, SpecError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (SpecError, CallError) as e:
        print(f"mixforge: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mixforge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
