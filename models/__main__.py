"""`python -m models describe NAME --num-classes C --input 3x32x32 [--latency 1 8]` prints per-exit costs.

With `--latency`, it also measures on this machine's CPU (median of 20 runs, one torch thread unless
`--threads`) the milliseconds to answer at each exit: the stages up to it plus its head.
"""

from __future__ import annotations

import argparse
import sys

import torch

from models.cost import exit_costs, format_cost_table, profile_latency
from models.registry import build_model, list_models


def _shape(text: str) -> tuple[int, int, int]:
    try:
        c, h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"input must look like 3x32x32, got {text!r}") from None
    return c, h, w


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list registered models")
    d = sub.add_parser("describe", help="per-exit parameters and FLOPs")
    d.add_argument("name")
    d.add_argument("--num-classes", type=int, default=100)
    d.add_argument("--input", type=_shape, default=(3, 32, 32), help="CxHxW, e.g. 3x32x32")
    d.add_argument("--stem", choices=["cifar", "imagenet"], default="cifar")
    d.add_argument("--latency", type=int, nargs="+", metavar="BATCH", help="measure per-exit CPU latency")
    d.add_argument("--threads", type=int, default=1, help="torch threads for --latency")
    d.add_argument("--exits", type=int, nargs="+", help="ResNets: blocks to put an exit after (1-based)")
    d.add_argument("--exit-style", choices=["conv", "sepconv", "light"], default="conv")
    args = parser.parse_args(argv)
    if args.command == "list":
        sys.stdout.write("\n".join(list_models()) + "\n")
        return 0
    try:
        extra = {"exits": args.exits} if args.exits else {}
        model = build_model(
            args.name, args.num_classes, in_channels=args.input[0], stem=args.stem, exit_style=args.exit_style, **extra
        )
    except ValueError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    costs = exit_costs(model, args.input)
    sys.stdout.write(f"{args.name}: {args.num_classes} classes, input {'x'.join(map(str, args.input))}\n")
    sys.stdout.write(format_cost_table(costs) + "\n")
    if args.latency:
        torch.set_num_threads(args.threads)
        profile = profile_latency(model.eval(), args.input, tuple(args.latency), repeats=20, warmup=3)
        sys.stdout.write(f"\nms to answer at each exit (CPU, {args.threads} thread(s), median of 20):\n")
        sys.stdout.write(f"{'exit':>4}" + "".join(f"  {'batch ' + str(b):>10}" for b in args.latency) + "\n")
        for k in range(model.num_exits):
            cells = []
            for b in args.latency:
                stages = sum(profile[i][str(b)].stage_ms for i in range(k + 1))
                cells.append(f"  {stages + profile[k][str(b)].head_ms:>10.2f}")
            sys.stdout.write(f"{k + 1:>4}" + "".join(cells) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
