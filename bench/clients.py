"""The raw S3 clients a benchmark compares Pail with, and the upload of the object.

raw_awscrt and raw_boto3 read the whole object once, timed, with the same client
settings as Pail's two data paths (crt_client makes the awscrt client, also for the write
benchmark); upload puts an object of ``block`` repeated (a
RepeatingBlock, so a large object never sits in memory) under KEY.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_futures

from bench.system import MB, BenchError, MiB, cpu_seconds, machine_cpu, machine_ticks

PART_SIZE = 8 * MiB  # awscrt's part size, boto3's range size (Pail's own request size)
BOTO3_THREADS = 16  # as many as Pail's boto3 data path uses
READ_TIMEOUT = 300.0
REGION = "us-east-1"
KEY = "bench/seq-read.bin"


# ------------------------------------------------------------------ the object
class RepeatingBlock:
    """A read-only, seekable file of ``size`` bytes: ``block`` repeated. boto3's
    upload_fileobj reads one part at a time from it, so 1 GiB never sits in memory."""

    def __init__(self, block: bytes, size: int) -> None:
        self._block = block
        self._size = size
        self._pos = 0

    def read(self, n: int = -1) -> bytes:
        end = self._size if n is None or n < 0 else min(self._size, self._pos + n)
        out = bytearray()
        while self._pos < end:
            at = self._pos % len(self._block)
            take = min(end - self._pos, len(self._block) - at)
            out += self._block[at:at + take]
            self._pos += take
        return bytes(out)

    def readinto(self, buffer) -> int:  # awscrt reads a request body with this
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        pass


def upload(server, bucket: str, block: bytes, size: int) -> dict:
    from boto3.s3.transfer import TransferConfig

    client = server.client()
    config = TransferConfig(multipart_threshold=64 * MiB, multipart_chunksize=64 * MiB,
                            max_concurrency=4, use_threads=True)
    t0 = time.perf_counter()
    client.upload_fileobj(RepeatingBlock(block, size), bucket, KEY, Config=config)
    seconds = time.perf_counter() - t0
    head = client.head_object(Bucket=bucket, Key=KEY)
    if head["ContentLength"] != size:
        raise BenchError(f"uploaded {head['ContentLength']} bytes, expected {size}")
    return {"seconds": seconds, "mb_s": size / seconds / MB, "etag": head["ETag"]}


# ------------------------------------------------------------------ raw clients
def crt_client(server):
    """An awscrt S3Client with Pail's settings for this server (plain HTTP, SigV4)."""
    import awscrt.auth
    import awscrt.io
    import awscrt.s3

    event_loops = awscrt.io.EventLoopGroup(max(2, min(8, os.cpu_count() or 2)))  # as Pail
    bootstrap = awscrt.io.ClientBootstrap(event_loops, awscrt.io.DefaultHostResolver(event_loops))
    credentials = awscrt.auth.AwsCredentialsProvider.new_static(server.access_key, server.secret_key)
    client = awscrt.s3.S3Client(
        bootstrap=bootstrap, region=REGION,
        signing_config=awscrt.s3.create_default_s3_signing_config(region=REGION,
                                                                  credential_provider=credentials),
        tls_mode=awscrt.s3.S3RequestTlsMode.DISABLED, part_size=PART_SIZE,
        memory_limit=1024 * MiB, throughput_target_gbps=10.0,  # as Pail
    )
    return client


def raw_awscrt(server, bucket: str, size: int) -> dict:
    import awscrt.http
    import awscrt.s3

    client = crt_client(server)
    host = server.endpoint.split("://", 1)[1]
    request = awscrt.http.HttpRequest("GET", f"/{bucket}/{KEY}", awscrt.http.HttpHeaders([("Host", host)]))
    received = [0]
    lock = threading.Lock()

    def on_body(chunk, offset, **_):
        with lock:
            received[0] += len(chunk)

    cpu0, ticks0, server0 = os.times(), machine_ticks(), cpu_seconds(server.process.pid)
    t0 = time.perf_counter()
    meta = client.make_request(type=awscrt.s3.S3RequestType.GET_OBJECT, request=request, on_body=on_body)
    try:
        meta.finished_future.result(timeout=READ_TIMEOUT)
    except TimeoutError:
        meta.cancel()
        raise BenchError(f"awscrt GET did not finish within {READ_TIMEOUT:.0f} s") from None
    seconds = time.perf_counter() - t0
    cpu1, ticks1, server1 = os.times(), machine_ticks(), cpu_seconds(server.process.pid)
    if received[0] != size:
        raise BenchError(f"awscrt received {received[0]} bytes, expected {size}")
    return {"bytes": size, "seconds": seconds, "mb_s": size / seconds / MB,
            "client_cpu_s": round((cpu1.user - cpu0.user) + (cpu1.system - cpu0.system), 2),
            "server_cpu_s": round((server1 or 0) - (server0 or 0), 2),
            "machine": machine_cpu(ticks0, ticks1)}


def raw_boto3(server, bucket: str, size: int) -> dict:
    client = server.client(max_pool_connections=BOTO3_THREADS * 2, read_timeout=60)
    ranges = [(start, min(size, start + PART_SIZE) - 1) for start in range(0, size, PART_SIZE)]

    def get(r: tuple[int, int]) -> int:
        response = client.get_object(Bucket=bucket, Key=KEY, Range=f"bytes={r[0]}-{r[1]}")
        return len(response["Body"].read())

    pool = ThreadPoolExecutor(BOTO3_THREADS, thread_name_prefix="bench-boto3")
    cpu0, ticks0, server0 = os.times(), machine_ticks(), cpu_seconds(server.process.pid)
    t0 = time.perf_counter()
    try:
        futures = [pool.submit(get, r) for r in ranges]
        done, pending = wait_futures(futures, timeout=READ_TIMEOUT)
        if pending:
            raise BenchError(f"boto3 GETs did not finish within {READ_TIMEOUT:.0f} s")
        received = sum(f.result() for f in done)
        seconds = time.perf_counter() - t0
        cpu1, ticks1, server1 = os.times(), machine_ticks(), cpu_seconds(server.process.pid)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    if received != size:
        raise BenchError(f"boto3 received {received} bytes, expected {size}")
    return {"bytes": size, "seconds": seconds, "mb_s": size / seconds / MB,
            "client_cpu_s": round((cpu1.user - cpu0.user) + (cpu1.system - cpu0.system), 2),
            "server_cpu_s": round((server1 or 0) - (server0 or 0), 2),
            "machine": machine_cpu(ticks0, ticks1)}

