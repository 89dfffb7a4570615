"""The plain baseline most teams write first: FastAPI + uvicorn running the whole network per request.

Benchmark-only (not part of the product). Run: `python -m bench.peers.baseline --port 8300`.
It loads the same artifact through models/artifact.py and answers with the deepest exit.
"""

from __future__ import annotations

import argparse
import io

import torch
import uvicorn
from fastapi import FastAPI, Request
from PIL import Image
from torchvision.transforms import v2

from models.artifact import load_artifact, resolve_artifact


def build_app(store: str, name: str) -> FastAPI:
    artifact = load_artifact(resolve_artifact(store, name))
    spec = artifact.manifest.input
    size = (spec.size, spec.size)
    steps = [
        v2.ToImage(),
        v2.Resize(size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(spec.mean, spec.std),
    ]
    transform = v2.Compose(steps)
    classes = artifact.manifest.classes
    app = FastAPI()

    @app.post("/classify")
    async def classify(request: Request) -> dict:
        image = Image.open(io.BytesIO(await request.body())).convert(spec.color_mode)
        with torch.inference_mode():
            logits = artifact.model(transform(image).unsqueeze(0)).logits[-1]
        index = int(logits.argmax())
        exits = artifact.num_exits
        return {"label": classes[index], "index": index, "exit": exits, "reason": "final"}

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", default="model_store")
    parser.add_argument("--name", default="fashion-mnist")
    parser.add_argument("--port", type=int, default=8300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    uvicorn.run(build_app(args.store, args.name), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
