"""`anytime-bench`: replay Fashion-MNIST test images against a server, open or closed loop.

Open loop sends at Poisson arrival times (`--rate`), closed loop keeps `--concurrency` requests
in flight. Every run is bounded by `--duration` and `--requests` and stops by itself; every
request records latency, status, exit, reason and whether the label was right. The result is
a JSON file, a summary table and PNG plots (latency CDF, exit distribution, accuracy and
attainment by deadline).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx

from client.idx import read_idx
from client.stats import Record, by_deadline, format_summary, summarize

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def fashion_mnist_pngs(count: int, data_dir: str | None = None) -> list[tuple[bytes, int]]:
    """The first `count` Fashion-MNIST test images as PNG bytes, with their labels."""
    from PIL import Image

    root = Path(data_dir or os.environ.get("ANYTIME_DATA_DIR") or DEBIAN_FASHION_MNIST)
    images = read_idx(root / "t10k-images-idx3-ubyte.gz")[:count]
    labels = read_idx(root / "t10k-labels-idx1-ubyte.gz")[:count]
    out = []
    for img, label in zip(images, labels, strict=True):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        out.append((buf.getvalue(), int(label)))
    return out


class LoadRun:
    """One bounded load run against `url`."""

    def __init__(
        self,
        url: str,
        images: list[tuple[bytes, int]],
        duration_s: float,
        max_requests: int,
        deadlines_ms: list[float] | None = None,
        params: dict[str, Any] | None = None,
        seed: int = 0,
        progress: bool = True,
        path: str = "/classify",
    ) -> None:
        self.url, self.images, self.path = url.rstrip("/"), images, path
        self.duration_s, self.max_requests = duration_s, max_requests
        self.deadlines, self.params = deadlines_ms or [], params or {}
        self.rng = random.Random(seed)
        self.records: list[Record] = []
        self.progress = progress
        self.stopped = False  # set by stop(): no new requests (those sent are still awaited)

    def stop(self) -> None:
        """End the run early (thread-safe: read by the sending loop between requests)."""
        self.stopped = True

    async def _one(self, http: httpx.AsyncClient, i: int, start: float) -> None:
        png, label = self.images[i % len(self.images)]
        deadline = self.rng.choice(self.deadlines) if self.deadlines else None
        headers = {"content-type": "image/png"}
        timeout = 30.0
        if deadline is not None:
            headers["x-deadline-ms"] = f"{deadline:g}"
            timeout = deadline / 1e3 + 5.0
        sent = time.perf_counter()
        rec = Record(sent - start, 0.0, 0, deadline_ms=deadline)
        try:
            r = await http.post(self.path, content=png, headers=headers, params=self.params, timeout=timeout)
            rec.status = r.status_code
            if r.status_code == 200:
                body = r.json()
                rec.exit, rec.reason, rec.correct = int(body["exit"]), body["reason"], int(body["index"]) == label
        except httpx.HTTPError:
            rec.status = 0
        rec.latency_ms = (time.perf_counter() - sent) * 1e3
        self.records.append(rec)
        if self._bar is not None:
            self._bar.update(1)

    async def open_loop(self, rate: float) -> float:
        """Poisson arrivals at `rate` per second; returns the run's duration in seconds."""
        return await self._run(lambda http, start: self._poisson(http, start, rate), max_connections=1000)

    async def closed_loop(self, concurrency: int) -> float:
        """`concurrency` clients, each sending its next request when the last is answered."""
        return await self._run(lambda http, start: self._closed(http, start, concurrency), concurrency)

    async def _poisson(self, http: httpx.AsyncClient, start: float, rate: float) -> None:
        tasks, t, i = [], 0.0, 0
        while i < self.max_requests:
            t += self.rng.expovariate(rate)
            if t > self.duration_s or self.stopped:
                break
            await asyncio.sleep(max(0.0, start + t - time.perf_counter()))
            tasks.append(asyncio.create_task(self._one(http, i, start)))
            i += 1
        await asyncio.gather(*tasks)

    async def _closed(self, http: httpx.AsyncClient, start: float, concurrency: int) -> None:
        counter = iter(range(self.max_requests))

        async def worker() -> None:
            for i in counter:
                if time.perf_counter() - start > self.duration_s or self.stopped:
                    return
                await self._one(http, i, start)

        await asyncio.gather(*(worker() for _ in range(concurrency)))

    async def _run(self, body, max_connections: int) -> float:
        from tqdm import tqdm

        self._bar = tqdm(total=self.max_requests, unit="req", disable=not self.progress, leave=False)
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        async with httpx.AsyncClient(base_url=self.url, limits=limits) as http:
            start = time.perf_counter()
            await body(http, start)
            duration = time.perf_counter() - start
        self._bar.close()
        self._bar = None
        return duration

    _bar: Any = None


def plot_run(name: str, records: list[Record], out: Path) -> list[Path]:
    """Latency CDF, exit distribution, and accuracy / attainment per deadline, as PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = sorted(r.latency_ms for r in records if r.status == 200)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot(ok, [(i + 1) / len(ok) for i in range(len(ok))] if ok else [])
    axes[0].set(xlabel="latency (ms, client side)", ylabel="fraction of answered requests", title="Latency CDF")
    axes[0].grid(alpha=0.3)
    exits = sorted({r.exit for r in records if r.exit})
    axes[1].bar([str(e) for e in exits], [sum(r.exit == e for r in records) for e in exits], color="tab:green")
    axes[1].set(xlabel="exit", ylabel="answers", title="Exit distribution")
    per_deadline = by_deadline(records)
    if per_deadline:
        labels = list(per_deadline)
        acc = [100 * v["accuracy"] for v in per_deadline.values()]
        att = [100 * v["attainment"] for v in per_deadline.values()]
        axes[2].plot(labels, acc, "o-", label="accuracy of answers (%)")
        axes[2].plot(labels, att, "s--", label="answered within deadline (%)")
        axes[2].legend(fontsize=8)
    axes[2].set(xlabel="deadline (ms)", ylabel="%", title="Accuracy and attainment by deadline")
    fig.suptitle(name)
    fig.tight_layout()
    path = out / f"{name}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def run_and_report(args: argparse.Namespace, images: list[tuple[bytes, int]]) -> dict[str, Any]:
    """Run the load the arguments describe; write JSON and plots; return the summary."""
    params = {k: v for k, v in (("threshold", args.threshold), ("max_exit", args.max_exit)) if v is not None}
    run = LoadRun(
        args.url, images, args.duration, args.requests, args.deadline_ms, params, args.seed, not args.no_progress
    )
    coro = run.open_loop(args.rate) if args.rate else run.closed_loop(args.concurrency)
    duration = asyncio.run(coro)
    summary = summarize(run.records, duration)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    load = {"rate": args.rate} if args.rate else {"concurrency": args.concurrency}
    payload = {
        "name": args.name,
        "url": args.url,
        "load": load,
        "params": params,
        "summary": summary,
        "records": [asdict(r) for r in run.records],
    }
    (out / f"{args.name}.json").write_text(json.dumps(payload, indent=1))
    plot_run(args.name, run.records, out)
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="anytime-bench", description=__doc__)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    loop = p.add_mutually_exclusive_group()
    loop.add_argument("--rate", type=float, help="open loop: Poisson arrivals per second")
    loop.add_argument("--concurrency", type=int, default=8, help="closed loop: requests in flight")
    p.add_argument("--duration", type=float, default=10.0, help="stop sending after this many seconds")
    p.add_argument("--requests", type=int, default=100_000, help="stop after this many requests")
    p.add_argument("--deadline-ms", type=float, nargs="+", help="deadline(s); each request draws one")
    p.add_argument("--threshold", type=float, help="override every exit's threshold (1: full depth)")
    p.add_argument("--max-exit", type=int)
    p.add_argument("--images", type=int, default=1000, help="how many test images to cycle through")
    p.add_argument("--data-dir", help="directory of the Fashion-MNIST IDX files")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="run", help="file name stem of the results")
    p.add_argument("--out", default="bench/results", help="directory for JSON and PNG results")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    host = httpx.URL(args.url).host
    if host not in ("127.0.0.1", "localhost", "::1") and not host.startswith("127."):
        sys.stderr.write("anytime-bench: refusing to load a non-loopback address; benchmarks stay on this machine\n")
        return 2
    summary = run_and_report(args, fashion_mnist_pngs(args.images, args.data_dir))
    sys.stdout.write(format_summary(args.name, summary) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
