"""Run under `torchrun` (or alone): a few BYOT steps on a fixed global batch, each rank on its slice.

BatchNorm stays in eval mode so a half batch is normalised exactly as the full batch would be;
what is under test is DDP's gradient averaging and that every rank ends with the same weights.
The hint is the per-sample "l2" form: the reference code's batch L2 norm is a norm over the
whole batch, so under DDP each rank takes the norm of its own slice (docs/training.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from models import build_model
from models.seed import seed_everything
from training.config import TrainConfig
from training.trainer import init_distributed, leave_distributed, train_step


def main(out_dir: str) -> None:
    ctx = init_distributed()
    seed_everything(0)
    model = build_model("test_tiny", 4).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, 16, 16, generator=g)
    y = torch.randint(0, 4, (8,), generator=g)
    x, y = x.chunk(ctx.world_size)[ctx.rank], y.chunk(ctx.world_size)[ctx.rank]
    net = DistributedDataParallel(model) if ctx.world_size > 1 else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    cfg = TrainConfig(method="byot", hint="l2")
    for _ in range(3):
        train_step(net, x, y, optimizer, None, cfg, None)
    torch.save(model.state_dict(), Path(out_dir) / f"world{ctx.world_size}-rank{ctx.rank}.pt")
    leave_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
