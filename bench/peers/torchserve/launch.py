"""Packs the artifact into a .mar and writes a config.properties with every listener on 127.0.0.1.

Benchmark-only; used by bench/run.py. Token auth is disabled for the benchmark alone.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def prepare(artifact_dir: Path, work: Path, ports: list[int], workers: int = 2, batch_size: int = 8) -> list[str]:
    """Archive the model, write the config, and return the torchserve command line."""
    store = work / "model-store"
    store.mkdir(parents=True, exist_ok=True)
    archiver = Path(sys.executable).with_name("torch-model-archiver")
    extra = ",".join(str(artifact_dir / f) for f in ("manifest.json", "weights.safetensors"))
    subprocess.run(
        [
            str(archiver),
            "--model-name",
            "anytime",
            "--version",
            "1.0",
            "--handler",
            str(HERE / "handler.py"),
            "--extra-files",
            extra,
            "--export-path",
            str(store),
            "--force",
        ],
        check=True,
        timeout=120,
    )
    inference, management, metrics, grpc_inference, grpc_management = ports
    config = work / "config.properties"
    config.write_text(
        "\n".join(
            [
                f"inference_address=http://127.0.0.1:{inference}",
                f"management_address=http://127.0.0.1:{management}",
                f"metrics_address=http://127.0.0.1:{metrics}",
                "grpc_inference_address=127.0.0.1",
                f"grpc_inference_port={grpc_inference}",
                "grpc_management_address=127.0.0.1",
                f"grpc_management_port={grpc_management}",
                "disable_token_authorization=true",
                "install_py_dep_per_model=false",
                "disable_system_metrics=true",
                f"default_workers_per_model={workers}",
                f"model_store={store}",
                "load_models=anytime.mar",
                f'models={{"anytime": {{"1.0": {{"marName": "anytime.mar", "minWorkers": {workers}, '
                f'"maxWorkers": {workers}, "batchSize": {batch_size}, "maxBatchDelay": 2}}}}}}',
            ]
        )
        + "\n"
    )
    torchserve = Path(sys.executable).with_name("torchserve")
    return [
        str(torchserve),
        "--start",
        "--foreground",
        "--ncs",
        "--disable-token-auth",
        "--ts-config",
        str(config),
        "--model-store",
        str(store),
    ]
