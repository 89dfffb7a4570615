"""KServe's own clients against a running Anytime server (run by tests/test_oip.py in its own process).

KServe's generated protobuf modules and tritonclient's register the same `inference.*` symbols, so
they cannot share a process. Usage: kserve_client.py HTTP_URL GRPC_HOST:PORT IMAGE.png; prints one
JSON line with what each client saw.
"""

from __future__ import annotations

import asyncio
import json
import sys

import numpy as np
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig
from kserve.protocol.infer_type import RequestedOutput

MODEL = "fashion-mnist"


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def main(url: str, grpc_url: str, image_path: str) -> dict:
    png = open(image_path, "rb").read()
    rest = InferenceRESTClient(RESTConfig(protocol="v2", retries=0))
    image = InferInput("image", [1], "BYTES")
    image.set_data_from_numpy(np.array([png], dtype=np.object_), binary_data=True)
    request = InferRequest(MODEL, [image], request_outputs=[RequestedOutput("label"), RequestedOutput("exit")])
    rest_answer = await rest.infer(url, request, model_name=MODEL)
    tensor = InferInput("input", [2, 1, 28, 28], "FP32")
    tensor.set_data_from_numpy(np.zeros((2, 1, 28, 28), np.float32), binary_data=False)
    tensor_answer = await rest.infer(url, InferRequest(MODEL, [tensor]), model_name=MODEL)
    rest_ready = (
        await rest.is_server_live(url) and await rest.is_server_ready(url) and await rest.is_model_ready(url, MODEL)
    )
    await rest.close()
    grpc = InferenceGRPCClient(grpc_url, retries=0)
    grpc_ready = await grpc.is_server_live() and await grpc.is_server_ready() and await grpc.is_model_ready(MODEL)
    image = InferInput("image", [1], "BYTES")
    image.set_data_from_numpy(np.array([png], dtype=np.object_), binary_data=True)
    grpc_answer = await grpc.infer(InferRequest(MODEL, [image], request_outputs=[RequestedOutput("label")]))
    await grpc.close()
    return {
        "rest": {
            "ready": bool(rest_ready),
            "label": _text(rest_answer.get_output_by_name("label").as_numpy()[0]),
            "exit": int(rest_answer.get_output_by_name("exit").as_numpy()[0]),
            "tensor_classes": len(tensor_answer.get_output_by_name("class_index").as_numpy()),
        },
        "grpc": {"ready": bool(grpc_ready), "label": _text(grpc_answer.get_output_by_name("label").as_numpy()[0])},
    }


if __name__ == "__main__":
    sys.stdout.write(json.dumps(asyncio.run(main(*sys.argv[1:4]))) + "\n")
