"""The raw S3 client's side of each bench.compare workload: the same work without a file
system, so that the ratio to it says what the mount costs.

Object data goes through awscrt's S3Client with Pail's settings (bench.clients.crt_client),
the 256 KiB random reads included; listing and the small files through boto3, one client
made before the clock starts (its first request still opens a connection, as a fresh
mount's do).
"""

from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from bench.clients import READ_TIMEOUT, crt_client, raw_awscrt
from bench.dataset import LIST_PREFIX, SMALL_FILE_SIZE, Dataset, mb_s
from bench.randread import READ_SIZE, expected, offsets
from bench.system import BenchError
from bench.writes import raw_awscrt as put_awscrt


def seq_read(server, data: Dataset) -> dict:
    return raw_awscrt(server, data.bucket, data.size)  # reads data.big_key (bench.clients.KEY)


def _crt_get(client, server, bucket: str, key: str, on_body):
    import awscrt.http
    import awscrt.s3

    host = server.endpoint.split("://", 1)[1]
    request = awscrt.http.HttpRequest("GET", f"/{bucket}/{key}", awscrt.http.HttpHeaders([("Host", host)]))
    return client.make_request(type=awscrt.s3.S3RequestType.GET_OBJECT, request=request, on_body=on_body)


def parallel_read(server, data: Dataset) -> dict:
    client = crt_client(server)
    received = [0] * len(data.parallel_keys)
    lock = threading.Lock()

    def counter(n: int):
        def on_body(chunk, offset, **_):
            with lock:
                received[n] += len(chunk)
        return on_body

    t0 = time.perf_counter()
    metas = [_crt_get(client, server, data.bucket, key, counter(n)) for n, key in enumerate(data.parallel_keys)]
    for meta in metas:
        try:
            meta.finished_future.result(timeout=READ_TIMEOUT)
        except TimeoutError:
            for m in metas:
                m.cancel()
            raise BenchError(f"parallel awscrt GETs did not finish within {READ_TIMEOUT:.0f} s") from None
    seconds = time.perf_counter() - t0
    if received != [data.size] * len(data.parallel_keys):
        raise BenchError(f"parallel awscrt GETs received {received}, expected {data.size} each")
    total = sum(received)
    return {"bytes": total, "seconds": seconds, "mb_s": mb_s(total, seconds)}


def ttfb(server, data: Dataset) -> dict:
    """From make_request to the first on_body callback, then the request is cancelled.
    awscrt hands the body over a part (8 MiB) at a time, so this is the time to the first
    part; on_headers (the first response's headers) is recorded too."""
    import awscrt.http
    import awscrt.s3

    client = crt_client(server)
    first_body = threading.Event()
    stamps: dict[str, float] = {}

    def on_headers(**_):
        stamps.setdefault("headers", time.perf_counter())

    def on_body(chunk, offset, **_):
        if "body" not in stamps:
            stamps["body"] = time.perf_counter()
            stamps["first_chunk"] = len(chunk)
            first_body.set()

    host = server.endpoint.split("://", 1)[1]
    request = awscrt.http.HttpRequest("GET", f"/{data.bucket}/{data.big_key}",
                                      awscrt.http.HttpHeaders([("Host", host)]))
    t0 = time.perf_counter()
    meta = client.make_request(type=awscrt.s3.S3RequestType.GET_OBJECT, request=request, on_body=on_body,
                               on_headers=on_headers)
    got = first_body.wait(READ_TIMEOUT)
    meta.cancel()
    with contextlib.suppress(Exception):  # cancelled on purpose: it ends with an error
        meta.finished_future.result(timeout=30)
    if not got:
        raise BenchError(f"no body from awscrt within {READ_TIMEOUT:.0f} s")
    seconds = stamps["body"] - t0
    return {"seconds": seconds, "ms": seconds * 1e3, "first_headers_ms": (stamps["headers"] - t0) * 1e3,
            "first_chunk_bytes": stamps["first_chunk"]}


def rand_read(server, data: Dataset, threads: int, reads: int) -> dict:
    """The offsets bench.randread reads, as ranged GETs through awscrt's S3Client, one
    request in flight per thread. Until 2026-12-03 (run AD included) these went through
    boto3, whose threads take turns at the GIL: a raw client slower than the mounts it is
    to measure them against (AD: 51 and 77 MB/s with 1 and 4 threads, where awscrt read
    115 and 241 and Pail 101 and 279 on the same machine an hour later)."""
    import awscrt.http
    import awscrt.s3

    client = crt_client(server)
    host = server.endpoint.split("://", 1)[1]
    ready = threading.Barrier(threads + 1)
    latencies: list[float] = []

    def get(offset: int, end: int) -> bytes:
        parts: list[bytes] = []
        headers = awscrt.http.HttpHeaders([("Host", host), ("Range", f"bytes={offset}-{end}")])
        request = awscrt.http.HttpRequest("GET", f"/{data.bucket}/{data.big_key}", headers)
        meta = client.make_request(type=awscrt.s3.S3RequestType.GET_OBJECT, request=request,
                                   on_body=lambda chunk, offset, **_: parts.append(bytes(chunk)))
        try:
            meta.finished_future.result(timeout=READ_TIMEOUT)
        except TimeoutError:
            meta.cancel()
            raise BenchError(f"a ranged awscrt GET did not finish within {READ_TIMEOUT:.0f} s") from None
        return b"".join(parts)

    def run(thread: int) -> int:
        ready.wait()
        got = 0
        for offset in offsets(data.size, READ_SIZE, reads, thread):
            end = min(data.size, offset + READ_SIZE) - 1
            t0 = time.perf_counter()
            body = get(offset, end)
            latencies.append(time.perf_counter() - t0)
            if body != expected(data.block, offset, end - offset + 1):
                raise BenchError(f"wrong bytes at {offset}")
            got += len(body)
        return got

    with ThreadPoolExecutor(threads) as pool:
        futures = [pool.submit(run, n) for n in range(threads)]
        ready.wait()
        t0 = time.perf_counter()
        total = sum(f.result(timeout=READ_TIMEOUT) for f in futures)
        seconds = time.perf_counter() - t0
    latencies.sort()
    return {"bytes": total, "reads": len(latencies), "threads": threads, "read_size": READ_SIZE,
            "seconds": seconds, "mb_s": mb_s(total, seconds), "iops": len(latencies) / seconds,
            "latency_ms": {"median": latencies[len(latencies) // 2] * 1e3,
                           "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] * 1e3}}


def list_walk(server, data: Dataset) -> dict:
    """ListObjectsV2 of the directory, page after page, as a file client lists it (with
    the delimiter)."""
    client = server.client()
    t0 = time.perf_counter()
    keys = pages = 0
    token = None
    while True:
        kwargs = {"ContinuationToken": token} if token else {}
        page = client.list_objects_v2(Bucket=data.bucket, Prefix=LIST_PREFIX + "/", Delimiter="/", **kwargs)
        pages += 1
        keys += len(page.get("Contents", []))
        if not page.get("IsTruncated"):
            break
        token = page["NextContinuationToken"]
    seconds = time.perf_counter() - t0
    if keys != data.list_objects:
        raise BenchError(f"listed {keys} keys, expected {data.list_objects}")
    return {"entries": keys, "pages": pages, "seconds": seconds}


def cat_small(server, data: Dataset) -> dict:
    client = server.client()
    total = 0
    t0 = time.perf_counter()
    for key in data.small_keys:
        body = client.get_object(Bucket=data.bucket, Key=key)["Body"].read()
        if body != data.small_body:
            raise BenchError(f"wrong bytes in {key}")
        total += len(body)
    seconds = time.perf_counter() - t0
    if total != data.small_files * SMALL_FILE_SIZE:
        raise BenchError(f"read {total} bytes, expected {data.small_files * SMALL_FILE_SIZE}")
    return {"bytes": total, "files": data.small_files, "seconds": seconds, "files_per_s": data.small_files / seconds}


def seq_write(server, data: Dataset, key: str, head) -> dict:
    done = put_awscrt(server, data.bucket, key, data.block, data.size)
    if head(key) != data.size:
        raise BenchError(f"{key} is not complete after the PUT returned")
    return {**done, "key": key, "visible_at_return": True}
