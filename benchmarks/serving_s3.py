"""Workload f's S3 part: one adapter from an S3 object to a GPU slot, through the server's own code.

What the server does for a cold adapter (app/domain/completions/service.py, adapter_files.py,
engine_client.py): the request first makes sure the adapter is in the local disk cache
(`AdapterFiles.ensure`: `download_adapter` gets both files with `S3ObjectStore.get_to_file`, checks their
sha256 against the registry row, and the folder is renamed into place); then the engine's loader
callback only returns `AdapterFiles.local_folder(sha)`, and the AdapterCache reads it (bounded read,
sha256 again, parse, pin) and copies it into a slot. Both steps are timed here, on those same classes.

The S3 server is moto's (ThreadedMotoServer on a free loopback port, started here), so the download part
is moto's speed over loopback, not a real S3's over a network.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import logging
import shutil
import socket
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchmarks.serving_workloads import Bench
from engine.adapter_cache import AdapterCache
from engine.request import LoRARequest

BUCKET = "loraplex-bench"
REGION = "us-east-1"
# Far from the indices the other workloads use, so nothing is cached anywhere.
FIRST_INDEX = 20_000_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def moto_s3() -> Iterator[str]:
    """moto's S3 server on a free loopback port with BUCKET made; yields its endpoint URL."""
    import boto3
    from moto.server import ThreadedMotoServer

    # werkzeug logs every request at INFO; the benchmark's log is for the engine.
    quiet = logging.getLogger("werkzeug")
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    try:
        boto3.client(
            "s3",
            endpoint_url=url,
            region_name=REGION,
            aws_access_key_id="bench",
            aws_secret_access_key="bench",
        ).create_bucket(Bucket=BUCKET)
        yield url
    finally:
        server.stop()
        quiet.setLevel(level)


def _upload(store: Any, bench: Bench, index: int) -> Any:
    """Seeded adapter `index` into the store where the registry puts it; returns its (unsaved) row."""
    from app.domain.adapters.models import CONFIG_FILE, WEIGHTS_FILE, Adapter, object_prefix

    bench.qkvo.lora(index)  # writes its two files
    source = bench.qkvo.folder(index)
    shas = {}
    row = Adapter(id=uuid.uuid4(), tenant_id=uuid.uuid4(), name=f"s3-{index}", version=1, status="ready")
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        data = (source / name).read_bytes()
        shas[name] = hashlib.sha256(data).hexdigest()
        md5 = base64.b64encode(hashlib.md5(data).digest()).decode()
        store.put_file(
            object_prefix(row.tenant_id, row.id) + name, source / name, sha256=shas[name], md5_base64=md5
        )
    row.sha256, row.config_sha256 = shas[WEIGHTS_FILE], shas[CONFIG_FILE]
    row.size_bytes = (source / WEIGHTS_FILE).stat().st_size
    return row


def workload_f_s3(bench: Bench, count: int = 5) -> dict[str, Any]:
    """Median over `count` different adapters of S3 -> GPU slot, and of its download part alone.

    Returns {"s3": "skipped: <why>"} where boto3, moto or the app's storage code cannot be imported."""
    try:
        import moto.server  # noqa: F401

        from app.domain.adapters.service import download_adapter
        from app.domain.completions.adapter_files import AdapterFiles
        from app.storage import S3ObjectStore
    except ImportError as exc:
        return {"s3": f"skipped: {exc}"}

    engine = bench.engine
    work = Path(tempfile.mkdtemp(prefix="s3-", dir=bench.qkvo.root.parent))
    try:
        with moto_s3() as url:
            store = S3ObjectStore(
                BUCKET, endpoint_url=url, region=REGION, access_key_id="bench", secret_access_key="bench"
            )
            rows = [_upload(store, bench, FIRST_INDEX + k) for k in range(count)]
            # As Serving._adapter_files wires it for `loraplex serve`.
            files = AdapterFiles(work / "cache", lambda adapter, dest: download_adapter(store, adapter, dest))

            def loader(lora: LoRARequest) -> str:
                # What EngineClient._load_adapter returns once the server's files are attached.
                return files.local_folder(str(lora.content_hash))

            # The engine's own cache class and factory, with one slot of its own: the engine's slots stay
            # as the other workloads left them.
            config = dataclasses.replace(engine.config, max_loras=1)
            cache = AdapterCache.for_model(config, engine.model, loader)
            try:
                download, to_gpu = asyncio.run(_time_loads(cache, files, rows))
            finally:
                cache.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "s3": "moto ThreadedMotoServer on 127.0.0.1",
        "s3_object_bytes": rows[0].size_bytes,
        "s3_to_gpu_ms": statistics.median(to_gpu) * 1e3,
        "s3_download_ms": statistics.median(download) * 1e3,
        "s3_cache_to_gpu_ms": statistics.median([t - d for t, d in zip(to_gpu, download, strict=True)]) * 1e3,
        "s3_download_MBps": rows[0].size_bytes / statistics.median(download) / 1e6,
    }


async def _time_loads(cache: AdapterCache, files: Any, rows: list[Any]) -> tuple[list[float], list[float]]:
    """Per adapter: seconds to the verified local folder (the request's `ensure`), and to its GPU slot."""
    download, to_gpu = [], []
    for row in rows:
        start = time.perf_counter()
        folder = await files.ensure(row)
        download.append(time.perf_counter() - start)
        lora = LoRARequest(f"{row.name}@{row.version}", str(folder), content_hash=row.sha256)
        while cache.acquire(lora) is None:
            cache.wait_for_loads(timeout=0.001)
        to_gpu.append(time.perf_counter() - start)
        cache.release(lora)
    return download, to_gpu
