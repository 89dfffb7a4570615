"""TorchServe handler for the benchmark: the Anytime artifact served at full depth.

Benchmark-only. The .mar carries the artifact's manifest.json and weights.safetensors as extra
files; the network is rebuilt through models/artifact.py (the repository root is on PYTHONPATH).
TorchServe batches requests itself when the model is registered with a batch size.
"""

from __future__ import annotations

import io
from typing import Any

import torch
from PIL import Image
from torchvision.transforms import v2
from ts.torch_handler.base_handler import BaseHandler

from models.artifact import load_artifact


class AnytimeFullDepthHandler(BaseHandler):
    """preprocess → inference → postprocess, answering with the deepest exit."""

    def initialize(self, context: Any) -> None:
        torch.set_num_threads(1)
        self.artifact = load_artifact(context.system_properties["model_dir"])
        spec = self.artifact.manifest.input
        self.mode = spec.color_mode
        size = (spec.size, spec.size)
        self.transform = v2.Compose(
            [
                v2.ToImage(),
                v2.Resize(size),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(spec.mean, spec.std),
            ]
        )
        self.initialized = True

    def preprocess(self, data: list[dict[str, Any]]) -> torch.Tensor:
        images = []
        for row in data:
            body = row.get("data") or row.get("body")
            images.append(self.transform(Image.open(io.BytesIO(body)).convert(self.mode)))
        return torch.stack(images)

    def inference(self, data: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        with torch.inference_mode():
            return self.artifact.model(data).logits[-1]

    def postprocess(self, data: torch.Tensor) -> list[dict[str, Any]]:
        classes = self.artifact.manifest.classes
        exits = self.artifact.num_exits
        return [{"label": classes[i], "index": i, "exit": exits, "reason": "final"} for i in data.argmax(1).tolist()]
