"""`mixforge attention-map`: draw a mixer's implicit attention per head.

    mixforge attention-map gla --out gla.png [--T 64] [--heads 0,1] [--decay strong]
    mixforge attention-map examples/my_mixer.py:my_mixer --out mine.png
    mixforge attention-map --checkpoint results/mqar_gla.pt --out recall.png [--layer 0] [--recall] [--pairs 16]
"""
from __future__ import annotations

import os


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "attention-map",
        help="draw a mixer's implicit attention per head (random inputs or an MQAR checkpoint)",
        description="Per-head heatmaps of M[t, s], the weight of the value at s in the output at t "
                    "(mixforge.attention_map), on random inputs or on a held-out MQAR sequence.",
    )
    p.add_argument("spec", nargs="?", help="a zoo name, file.py:NAME or spec.json (not needed with --checkpoint)")
    p.add_argument("--out", default="attention-map.png", help="output image (.png, .svg, .pdf)")
    p.add_argument("--T", type=int, default=64, help="sequence length (random inputs; default 64)")
    p.add_argument("--H", type=int, default=2, help="heads (random inputs)")
    p.add_argument("--K", type=int, default=16, help="key dim (random inputs)")
    p.add_argument("--V", type=int, default=16, help="value dim (random inputs)")
    p.add_argument("--heads", default=None, help="comma-separated heads to draw (default: all)")
    p.add_argument("--decay", default="normal", choices=("normal", "strong", "weak"),
                   help="how strong the random inputs make the decay")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", default=None, help="an MQAR checkpoint (python -m benchmarks.mqar) to draw instead")
    p.add_argument("--layer", type=int, default=None, help="which layer of the checkpoint (default: all)")
    p.add_argument("--recall", action="store_true",
                   help="checkpoint: draw only the query rows against the key-value context")
    p.add_argument("--pairs", type=int, default=None,
                   help="checkpoint: draw a held-out sequence with this many key-value pairs (default: the model's)")
    p.set_defaults(func=_cmd_attention_map)


def _heads(text):
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        from mixforge.spec.errors import CallError

        raise CallError(f"--heads: expected comma-separated integers, got {text!r}") from None


def _mqar():
    """benchmarks.mqar's loaders; the benchmarks folder sits next to the package in a checkout."""
    import sys
    from pathlib import Path

    try:
        from benchmarks.mqar import load_checkpoint, plot_checkpoint_attention
    except ImportError:
        import mixforge

        for root in (Path.cwd(), Path(mixforge.__file__).resolve().parent.parent):
            if (root / "benchmarks" / "mqar.py").is_file() and str(root) not in sys.path:
                sys.path.insert(0, str(root))
        try:
            from benchmarks.mqar import load_checkpoint, plot_checkpoint_attention
        except ImportError as e:
            from mixforge.spec.errors import CallError

            raise CallError(f"--checkpoint needs benchmarks/mqar.py (run from the repository root): {e}") from None
    return load_checkpoint, plot_checkpoint_attention


def _cmd_attention_map(args) -> int:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from mixforge.plotting import plot_attention_map
    from mixforge.spec import load_mixer
    from mixforge.spec.errors import CallError
    from mixforge.spec.testing import random_inputs

    heads = _heads(args.heads)
    if args.checkpoint:
        load_checkpoint, plot_checkpoint_attention = _mqar()
        if not os.path.isfile(args.checkpoint):
            raise CallError(f"--checkpoint: no such file {args.checkpoint}")
        model, cfg = load_checkpoint(args.checkpoint)
        T = args.T if args.T != 64 else None           # default: the whole training length
        try:
            segment = None if args.pairs is None else (T or cfg.seq_len, args.pairs)
            plot_checkpoint_attention(model, cfg, args.out, layer=args.layer, heads=heads,
                                      T=None if segment else T, recall=args.recall, segment=segment)
        except ValueError as e:
            raise CallError(str(e)) from None
        which = "all layers" if args.layer is None else f"layer {args.layer % cfg.n_layers}"
        print(f"wrote {args.out}  (checkpoint {args.checkpoint}, {which})")
        return 0
    if not args.spec:
        raise CallError("attention-map needs a SPEC (zoo name, file.py:NAME, spec.json) or --checkpoint")
    mixer = load_mixer(args.spec)
    if args.T < 1:
        raise CallError(f"--T must be positive, got {args.T}")
    x = random_inputs(mixer, B=1, T=args.T, H=args.H, K=args.K, V=args.V, dtype=torch.float64, seed=args.seed,
                      decay=args.decay)
    try:
        plot_attention_map(mixer, x, heads=heads, out=args.out,
                           title=f"{mixer.name}: implicit attention on random inputs (T={args.T}, decay {args.decay})")
    except ValueError as e:
        raise CallError(str(e)) from None
    print(f"wrote {args.out}  ({mixer.name}, T={args.T}, {args.H} heads)")
    return 0
