"""`anytime-import torchvision ARCH --weights FILE --out DIR/init.pt`: pretrained weights → a trainer checkpoint.

The weights file is a torchvision state dict, saved with `torch.save` (read with
`torch.load(weights_only=True)`: no code is unpickled) or as safetensors; nothing is ever
downloaded. The checkpoint carries the multi-exit network (its stages and final exit holding
the weights, its shallow exits untrained) and its architecture, which `anytime-train --method ramps
--init` takes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from models.artifact import ArchitectureSpec
from models.pretrained import ARCHITECTURES, ImportMismatch, from_torchvision
from training.checkpoint import save_checkpoint


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file or a `torch.save`d one (weights only)."""
    if path.suffix == ".safetensors":
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return state


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="anytime-import", description=__doc__)
    sub = parser.add_subparsers(dest="source", required=True)
    tv = sub.add_parser("torchvision", help="a torchvision classification model")
    tv.add_argument("arch", choices=ARCHITECTURES)
    tv.add_argument("--weights", type=Path, required=True, help="the model's state dict (.pth/.pt or .safetensors)")
    tv.add_argument("--out", type=Path, required=True, help="checkpoint to write, e.g. runs/r50/init.pt")
    tv.add_argument("--exit-style", choices=["conv", "sepconv"], default="conv")
    tv.add_argument("--attention", action="store_true", help="attention gate before each shallow exit")
    args = parser.parse_args(argv)
    try:
        model = from_torchvision(
            args.arch, read_weights(args.weights), exit_style=args.exit_style, attention=args.attention
        )
    except (ImportMismatch, ValueError, OSError, RuntimeError) as exc:
        sys.stderr.write(f"anytime-import: error: {exc}\n")
        return 2
    fc = model.exits[-1]
    num_classes = fc.fc.out_features if hasattr(fc, "fc") else fc.classifier[-1].out_features
    spec = ArchitectureSpec(
        name=args.arch,
        num_classes=num_classes,
        in_channels=3,
        stem="imagenet",
        kwargs={
            "exit_style": args.exit_style,
            "attention": args.attention,
            **({"classifier": "imagenet"} if args.arch.startswith("vgg") else {}),
        },
    )
    save_checkpoint({"model": model.state_dict(), "model_spec": spec.model_dump()}, args.out)
    sys.stdout.write(f"{args.arch} with {model.num_exits} exits ({num_classes} classes) written to {args.out}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
