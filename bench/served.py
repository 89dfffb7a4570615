"""`python -m bench.served`: a bundled version's policy as served, over HTTP, on the whole test set.

Starts a server pinned to the version, sends every Fashion-MNIST test image to `/classify` as a PNG
(eight connections), and reports the accuracy of the answers, the share of each exit, and the
mean FLOPs of the exits taken (served cost: every head a request passed counts), as JSON and a
table. This is how the bundled model's headline figure is measured (docs/training.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx

from client.loadgen import fashion_mnist_pngs
from models.artifact import read_manifest
from tools.processes import ROOT, ServerProcess


async def _classify_all(url: str, images: list[tuple[bytes, int]], connections: int) -> list[dict[str, Any]]:
    answers: list[dict[str, Any] | None] = [None] * len(images)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(images)):
        queue.put_nowait(i)

    async def lane(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            i = queue.get_nowait()
            r = await client.post("/classify", content=images[i][0], headers={"content-type": "image/png"})
            r.raise_for_status()
            answers[i] = r.json()

    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        await asyncio.gather(*(lane(client) for _ in range(connections)))
    return [a for a in answers if a is not None]


def evaluate(store: Path, name: str, version: str, count: int, connections: int = 8) -> dict[str, Any]:
    manifest = read_manifest(store / name / version)
    cost = [e.served_flops_fraction or e.flops_fraction or 1.0 for e in manifest.exits]
    images = fashion_mnist_pngs(count)
    with tempfile.TemporaryDirectory(prefix="served-") as tmp:
        server = ServerProcess(store, name, log_dir=Path(tmp), model_version=version).wait_ready(timeout=300)
        try:
            answers = asyncio.run(_classify_all(server.url, images, connections))
        finally:
            server.stop()
    assert len(answers) == len(images) and all(a["version"] == version for a in answers)
    exits = [a["exit"] for a in answers]
    shares = {k: exits.count(k) / len(exits) for k in range(1, len(cost) + 1)}
    return {
        "model": name,
        "version": version,
        "images": len(answers),
        "accuracy": sum(a["index"] == y for a, (_, y) in zip(answers, images, strict=True)) / len(answers),
        "exit_shares": shares,
        "mean_served_flops": sum(cost[e - 1] for e in exits) / len(exits),
        "final_exit_test_accuracy": manifest.exits[-1].test_accuracy,
        "exit_blocks": manifest.architecture.kwargs.get("exits"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.served", description=__doc__)
    parser.add_argument("--store", type=Path, default=ROOT / "model_store")
    parser.add_argument("--name", default="fashion-mnist")
    parser.add_argument("--version", required=True)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    result = evaluate(args.store, args.name, args.version, args.images)
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    sys.stdout.write(
        f"{args.name} v{args.version} over HTTP on {result['images']} test images: accuracy "
        f"{100 * result['accuracy']:.2f} %, mean served FLOPs {result['mean_served_flops']:.1%} of the full network, "
        "exits " + ", ".join(f"{k}: {v:.1%}" for k, v in result["exit_shares"].items()) + "\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
