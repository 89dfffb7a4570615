"""`make bench-triton`: Triton's perf_analyzer against the bundled model over /v2, HTTP and gRPC.

perf_analyzer reads the model's configuration and metadata, sends the same requests a Triton user's
would (the `image` input: PNG bytes; the `input` input: the preprocessed FP32 tensor), and reports the
server's side of each request from the statistics extension (queue, compute input, infer, output).
It runs with the server on one core and perf_analyzer on the other (`taskset`), closed loop at each
concurrency, anytime (the artifact's thresholds) and at full depth (`threshold=1`, a request
parameter: perf_analyzer sends request parameters over gRPC only). The table goes to stdout and,
with the raw rows, to bench/results/triton.{json,md}. perf_analyzer itself comes from
tools/perf_analyzer.py (a venv, or a Debian 13 root where glibc is older than 2.38).
"""

from __future__ import annotations

import argparse
import base64
import csv
import io
import json
import os
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bench.workloads import fashion_images
from models.artifact import read_manifest, resolve_artifact
from models.preprocess import Preprocess
from tools import perf_analyzer
from tools.processes import ROOT, ServerProcess, free_port

MODEL = "fashion-mnist"
IMAGES = 16  # data entries perf_analyzer takes in turn: real test images, so exits vary as in use
SERVER_CPU, LOAD_CPU = 0, 1


def input_data(pngs: list[bytes], preprocess: Preprocess, work: Path) -> dict[str, Path]:
    """perf_analyzer's --input-data files: the images as BYTES (base64 of the serialized tensor: each
    element's 4-byte little-endian length, then its bytes) and as the preprocessed FP32 tensor."""
    image = [{"image": {"b64": base64.b64encode(struct.pack("<I", len(p)) + p).decode()}} for p in pngs]
    tensor = []
    for p in pngs:
        x = preprocess(Image.open(io.BytesIO(p))).numpy().astype(np.float32)
        tensor.append({"input": {"content": x.ravel().tolist(), "shape": list(x.shape)}})
    files = {"image": work / "image.json", "tensor": work / "tensor.json"}
    files["image"].write_text(json.dumps({"data": image}))
    files["tensor"].write_text(json.dumps({"data": tensor}))
    return files


def _rows(report: Path) -> list[dict[str, float]]:
    with report.open() as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


def measure(
    url: str, protocol: str, data: Path, concurrency: list[int], window_ms: int, full_depth: bool, work: Path
) -> list[dict[str, float]]:
    """perf_analyzer at each concurrency; its CSV rows (times in microseconds)."""
    rows = []
    for c in concurrency:
        args = ["-m", MODEL, "-u", url, "-i", protocol, "--input-data", str(data), "--concurrency-range", str(c)]
        args += ["-p", str(window_ms), "-s", "25", "-r", "6"]
        if full_depth:
            args += ["--request-parameter", "threshold:1:int"]
        report = work / f"pa-{protocol}-{data.stem}-{c}-{int(full_depth)}.csv"
        proc = perf_analyzer.run(args, report, timeout=300, cpu=LOAD_CPU)
        if proc.returncode != 0 or not report.exists():
            raise RuntimeError(f"perf_analyzer {' '.join(args)} failed:\n{(proc.stdout + proc.stderr)[-2000:]}")
        rows.extend(_rows(report))
    return rows


def _ms(row: dict[str, float], key: str) -> str:
    return f"{row.get(key, 0.0) / 1000:.2f}"


def table(runs: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| protocol | input | depth | concurrency | infer/s | p50 ms | p99 ms | server queue | compute input | "
        "compute infer | compute output |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in runs:
        for r in run["rows"]:
            times = [_ms(r, k) for k in ("p50 latency", "p99 latency", "Server Queue", "Server Compute Input",
                                         "Server Compute Infer", "Server Compute Output")]  # fmt: skip
            head = f"| {run['protocol']} | {run['input']} | {run['depth']} | {int(r['Concurrency'])} | "
            lines.append(head + f"{r['Inferences/Second']:.0f} | " + " | ".join(times) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.triton", description=__doc__)
    parser.add_argument("--store", type=Path, default=ROOT / "model_store")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--window-ms", type=int, default=2000, help="perf_analyzer's measurement window")
    parser.add_argument("--workers", type=int, default=1, help="ANYTIME_WORKERS of the server")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "triton.json")
    args = parser.parse_args(argv)
    if len(os.sched_getaffinity(0)) < 2:
        sys.exit("bench.triton needs two cores: the server on one, perf_analyzer on the other")
    try:
        perf_analyzer.command(["--version"])  # installs it before anything is measured
    except perf_analyzer.Unavailable as exc:
        sys.exit(f"bench.triton: {exc}")
    manifest = read_manifest(resolve_artifact(args.store, MODEL))
    with tempfile.TemporaryDirectory(prefix="anytime-triton-") as tmp:
        work = Path(tmp)
        paths, _ = fashion_images(work / "fmnist", IMAGES)
        files = input_data([p.read_bytes() for p in paths], Preprocess(manifest.input), work)
        grpc_port = free_port()
        server = ServerProcess(
            args.store, MODEL, log_dir=work, cpus=str(SERVER_CPU), grpc_port=grpc_port, workers=args.workers
        ).wait_ready(timeout=300)
        runs = []
        try:
            urls = {"http": server.url.removeprefix("http://"), "grpc": f"127.0.0.1:{grpc_port}"}
            for protocol, url in urls.items():
                for kind, data in files.items():
                    for full in (False, True) if protocol == "grpc" else (False,):
                        rows = measure(url, protocol, data, args.concurrency, args.window_ms, full, work)
                        depth = "full" if full else "anytime"
                        runs.append({"protocol": protocol, "input": kind, "depth": depth, "rows": rows})
        finally:
            server.stop()
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "model": f"{MODEL}/{manifest.version}",
        "workers": args.workers,
        "window_ms": args.window_ms,
        "runs": runs,
    }
    lines = table(runs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
