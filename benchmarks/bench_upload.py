"""Upload throughput: our publish (digest, staged multipart upload, verification, manifest) vs plain boto3.

    .venv/bin/python benchmarks/bench_upload.py [--size-mib 100] [--repeat 3]

Both go to the same moto server on 127.0.0.1 (started here). The baseline is
``client.upload_file`` with boto3's default transfer settings; publish uses
StorageConfig's defaults. Publish time includes everything it does: sha256 + CRC32
of the file, the upload with a full-object CRC32, HEAD verification, the manifest.
Further lines use boto3's part size and concurrency, and add ``verify_read_back`` (the
file is downloaded again and hashed).
Each figure is the median of ``--repeat`` rounds in which the variants take turns; a
fresh bucket per run keeps moto's memory flat.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from moto.server import ThreadedMotoServer

from finetune.config import StorageConfig
from finetune.publishing import publish_run
from finetune.store import open_store, s3_client

MiB = 1 << 20


def timed(
    variants: dict[str, Callable[[str], None]], setup: Callable[[], str], teardown: Callable[[str], None], repeat: int
) -> dict[str, float]:
    """Median seconds per variant; variants take turns so a change in machine load hits them alike."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeat):
        for name, run in variants.items():
            bucket = setup()
            start = time.perf_counter()
            run(bucket)
            times[name].append(time.perf_counter() - start)
            teardown(bucket)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    base = dict(endpoint_url=endpoint, region="us-east-1", access_key_id="bench", secret_access_key="bench")
    admin = s3_client(StorageConfig(**base))

    def new_bucket() -> str:
        name = f"bench-{uuid.uuid4().hex[:12]}"
        admin.create_bucket(Bucket=name)
        return name

    def drop_bucket(name: str) -> None:
        for page in admin.get_paginator("list_objects_v2").paginate(Bucket=name):
            for obj in page.get("Contents", []):
                admin.delete_object(Bucket=name, Key=obj["Key"])
        admin.delete_bucket(Bucket=name)

    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "bundle"
        bundle.mkdir()
        weights = bundle / "adapters.safetensors"
        with open(weights, "wb") as fh:
            for _ in range(args.size_mib):
                fh.write(os.urandom(MiB))
        (bundle / "adapter_config.json").write_text('{"fine_tune_type": "lora"}')

        import boto3

        plain_client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="bench",
            aws_secret_access_key="bench",
        )

        def plain(bucket: str) -> None:
            plain_client.upload_file(str(weights), bucket, "plain/adapters.safetensors")

        def publish_with(**extra) -> Callable[[str], None]:
            def run(bucket: str) -> None:
                store = open_store(StorageConfig(uri=f"s3://{bucket}/bench", **base, **extra))
                publish_run(store, f"run-{uuid.uuid4().hex[:8]}", bundle, {"benchmark": True})

            return run

        variants = {
            "boto3 upload_file (defaults)": plain,
            "publish_run (verify by stored checksum)": publish_with(),
            "publish_run, boto3's 8 MiB x 10 threads": publish_with(
                multipart_threshold_mib=8, multipart_chunk_mib=8, max_concurrency=10
            ),
            "publish_run + verify_read_back": publish_with(verify_read_back=True),
        }
        results = timed(variants, new_bucket, drop_bucket, args.repeat)
    server.stop()

    size = args.size_mib
    baseline = results["boto3 upload_file (defaults)"]
    print(f"{size} MiB to moto's server on 127.0.0.1, median of {args.repeat} (variants interleaved)")
    for name, seconds in results.items():
        print(f"  {name:<42} {seconds:6.2f} s  {size / seconds:6.1f} MiB/s  ratio {seconds / baseline:.2f}x")


if __name__ == "__main__":
    main()
