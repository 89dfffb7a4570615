"""`anytime-client classify IMAGE... [--deadline-ms N] [--json]`: classify images from the shell."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from client.client import AnytimeClient
from client.errors import AnytimeError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="anytime-client", description="Classify images with an Anytime server.")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("classify", help="classify one or more image files")
    c.add_argument("images", nargs="+")
    c.add_argument("--deadline-ms", type=float, help="latency budget per image")
    c.add_argument("--threshold", type=float, help="confidence threshold for every exit (1: always the last)")
    c.add_argument("--max-exit", type=int, help="answer at this exit at the latest")
    c.add_argument("--top-k", type=int, help="how many classes to show")
    c.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    c.add_argument(
        "--retries", type=int, default=2, help="resend after a refused connection or a 503 with Retry-After (0: never)"
    )
    args = parser.parse_args(argv)
    if args.retries < 0:
        parser.error("--retries must be 0 or more")
    failures = 0
    rows = []
    with AnytimeClient(args.url, retries=args.retries) as client:
        for path in args.images:
            try:
                r = client.classify(path, args.deadline_ms, args.threshold, args.max_exit, args.top_k)
            except (AnytimeError, OSError) as exc:
                failures += 1
                kind = type(exc).__name__
                if args.json:
                    sys.stdout.write(json.dumps({"image": path, "error": kind, "message": str(exc)}) + "\n")
                else:
                    rows.append((path, f"{kind}: {exc}", "", "", "", ""))
                continue
            if args.json:
                sys.stdout.write(json.dumps({"image": path, **asdict(r)}) + "\n")
            else:
                rows.append(
                    (path, r.label, f"{r.confidence:.3f}", f"{r.exit}/{r.exits}", r.reason, f"{r.round_trip_ms:.1f}")
                )
    if not args.json:
        header = ("image", "label", "confidence", "exit", "reason", "ms")
        widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
        for row in (header, *rows):
            sys.stdout.write("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
