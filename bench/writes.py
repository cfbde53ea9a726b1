"""What the write benchmark times, and how it checks the objects written.

raw_boto3 and raw_awscrt upload one object of ``block`` repeated, timed, the way Pail's
upload path does it and with awscrt's S3Client; mount_write writes it through a fresh
Pail mount with a child process (bench/writefile.py) and accounts for the mount process's
CPU and memory; trace_write_pass writes through a mount via the tests' recording proxy,
untimed, to describe the requests. head_size and verify_bytes check an object afterwards.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.clients import PART_SIZE, RepeatingBlock, crt_client
from bench.mounts import Mounts, _size_name
from bench.readfile import _same
from bench.system import (
    MB,
    BenchError,
    MiB,
    cpu_seconds,
    machine_cpu,
    machine_ticks,
    reset_peak_rss,
    settle,
    status_kib,
    thread_cpu,
)
from bench.writefile import _piece

WRITE_SIZE = 1 * MiB  # dd bs=1M
PARTS_IN_FLIGHT = 4  # as Pail (driver/config.py parts_in_flight)
WRITE_TIMEOUT = 300.0
ROOT = Path(__file__).resolve().parent.parent


def crc32c(data) -> str:
    """The base64 CRC32C that Pail sends with every part (its default --upload-checksums)."""
    import awscrt.checksums

    return base64.b64encode(awscrt.checksums.crc32c(data).to_bytes(4, "big")).decode()


def piece(block: bytes, offset: int, n: int) -> bytes:
    at = offset % len(block)
    return block[at:at + n] if at + n <= len(block) else _piece(block, offset, n)


def _timed(server, t0: float, cpu0, ticks0, server0, size: int) -> dict:
    seconds = time.perf_counter() - t0
    cpu1, ticks1, server1 = os.times(), machine_ticks(), cpu_seconds(server.process.pid)
    return {"bytes": size, "seconds": seconds, "mb_s": size / seconds / MB,
            "client_cpu_s": round((cpu1.user - cpu0.user) + (cpu1.system - cpu0.system), 2),
            "server_cpu_s": round((server1 or 0) - (server0 or 0), 2),
            "machine": machine_cpu(ticks0, ticks1)}


# ------------------------------------------------------------------ raw clients
def raw_boto3(server, bucket: str, key: str, block: bytes, size: int) -> dict:
    """Multipart upload as Pail sends it: CreateMultipartUpload (CRC32C), UploadPart of 8 MiB
    with its CRC32C, at most 4 at once from a thread pool, CompleteMultipartUpload."""
    client = server.client(max_pool_connections=PARTS_IN_FLIGHT * 2, read_timeout=60,
                           request_checksum_calculation="when_required",  # as Pail: its own CRC32C
                           response_checksum_validation="when_required")
    parts = [(n + 1, offset, min(PART_SIZE, size - offset))
             for n, offset in enumerate(range(0, size, PART_SIZE))]

    def put(part: tuple[int, int, int], upload_id: str) -> dict:
        number, offset, length = part
        body = piece(block, offset, length)
        checksum = crc32c(body)
        response = client.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number,
                                      Body=body, ChecksumCRC32C=checksum)
        return {"PartNumber": number, "ETag": response["ETag"], "ChecksumCRC32C": checksum}

    pool = ThreadPoolExecutor(PARTS_IN_FLIGHT, thread_name_prefix="bench-boto3")
    cpu0, ticks0, server0 = os.times(), machine_ticks(), cpu_seconds(server.process.pid)
    t0 = time.perf_counter()
    try:
        created = client.create_multipart_upload(Bucket=bucket, Key=key, ChecksumAlgorithm="CRC32C")
        upload_id = created["UploadId"]
        try:
            done = list(pool.map(lambda p: put(p, upload_id), parts, timeout=WRITE_TIMEOUT))
        except TimeoutError:
            raise BenchError(f"boto3 UploadParts did not finish within {WRITE_TIMEOUT:.0f} s") from None
        client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id,
                                         MultipartUpload={"Parts": done})
        return _timed(server, t0, cpu0, ticks0, server0, size) | {"parts": len(done)}
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def raw_awscrt(server, bucket: str, key: str, block: bytes, size: int) -> dict:
    """awscrt S3Client PUT_OBJECT of the whole object from a stream: it splits it into 8 MiB
    parts of a multipart upload and sends them on its native threads, CRC32C in a trailer."""
    import awscrt.http
    import awscrt.s3

    client = crt_client(server)
    host = server.endpoint.split("://", 1)[1]
    headers = awscrt.http.HttpHeaders([("Host", host), ("Content-Length", str(size)),
                                       ("Content-Type", "application/octet-stream")])
    request = awscrt.http.HttpRequest("PUT", f"/{bucket}/{key}", headers,
                                      body_stream=RepeatingBlock(block, size))
    checksums = awscrt.s3.S3ChecksumConfig(algorithm=awscrt.s3.S3ChecksumAlgorithm.CRC32C,
                                           location=awscrt.s3.S3ChecksumLocation.TRAILER)
    cpu0, ticks0, server0 = os.times(), machine_ticks(), cpu_seconds(server.process.pid)
    t0 = time.perf_counter()
    meta = client.make_request(type=awscrt.s3.S3RequestType.PUT_OBJECT, request=request,
                               checksum_config=checksums)
    try:
        meta.finished_future.result(timeout=WRITE_TIMEOUT)
    except TimeoutError:
        meta.cancel()
        raise BenchError(f"awscrt PUT did not finish within {WRITE_TIMEOUT:.0f} s") from None
    return _timed(server, t0, cpu0, ticks0, server0, size)


# ----------------------------------------------------------------- the mount
def write_file(path: str, size: int, block_file: Path) -> dict:
    command = [sys.executable, "-m", "bench.writefile", path, "--size", str(size), "--block", str(block_file),
               "--write-size", str(WRITE_SIZE)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=WRITE_TIMEOUT, cwd=ROOT,
                                stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired:
        raise BenchError(f"writing {path} did not finish within {WRITE_TIMEOUT:.0f} s") from None
    if result.returncode != 0:
        raise BenchError(f"writing {path} failed: {result.stderr.strip()[-2000:]}")
    return json.loads(result.stdout)


def mount_write(mounts: Mounts, server, bucket: str, key: str, size: int, block_file: Path) -> dict:
    directory, pid, log_path = mounts.mount(server, bucket, server.endpoint, "crt")
    prepared = settle()
    rss0 = status_kib(pid, "VmRSS")
    peak_reset = reset_peak_rss(pid)  # VmHWM from here on is the peak during the write
    cpu0, threads0, ticks0 = cpu_seconds(pid), thread_cpu(pid), machine_ticks()
    server0 = cpu_seconds(server.process.pid)
    wrote = write_file(os.path.join(directory, key), size, block_file)
    cpu1, threads1, ticks1 = cpu_seconds(pid), thread_cpu(pid), machine_ticks()
    server1 = cpu_seconds(server.process.pid)
    peak, rss1 = status_kib(pid, "VmHWM"), status_kib(pid, "VmRSS")
    n_threads = len(os.listdir(f"/proc/{pid}/task")) if os.path.isdir(f"/proc/{pid}/task") else None
    stored = head_size(server, bucket, key)  # close() returned: the object must be complete now
    unmount_s = mounts.unmount(directory)
    if wrote["bytes"] != size or stored != size:
        raise BenchError(f"wrote {wrote['bytes']} bytes through the mount, HEAD says {stored}, "
                         f"expected {size} (log {log_path})")
    seconds = wrote["seconds"]
    mount_cpu = (cpu1 or 0) - (cpu0 or 0)
    by_thread = {k: round(threads1.get(k, 0) - threads0.get(k, 0), 2) for k in threads1}
    return {
        "bytes": size, "seconds": seconds, "mb_s": size / seconds / MB,
        "close_s": round(wrote["close_s"], 3),
        "mount_cpu_s": round(mount_cpu, 2),
        "mount_cpu_util": round(mount_cpu / seconds, 2),  # 1.0 = one core busy all along
        "mount_main_thread_util": round(by_thread.get("main", 0) / seconds, 2),
        "mount_cpu_by_thread_s": by_thread,
        "mount_threads": n_threads,
        "rss_before_mib": round(rss0 / 1024, 1) if rss0 else None,
        "rss_after_mib": round(rss1 / 1024, 1) if rss1 else None,
        "peak_rss_mib": round(peak / 1024, 1) if peak else None,
        # the mount's peak RSS during the write above its RSS just before it
        "peak_rss_growth_mib": round((peak - rss0) / 1024, 1) if peak_reset and peak and rss0 else None,
        "server_cpu_s": round((server1 or 0) - (server0 or 0), 2),  # includes the writer's start-up
        "machine": machine_cpu(ticks0, ticks1),
        "writer_cpu_s": round(wrote["writer_cpu_s"], 2),
        "longest_write_s": round(wrote["longest_write_s"], 3),
        "slow_writes": wrote["slow_writes"],
        "mb_per_interval": [round(b / MB, 1) for b in wrote["bytes_per_interval"]],
        "head_size": stored,
        "unmount_s": round(unmount_s, 2),
        **prepared,
    }


def trace_write_pass(mounts: Mounts, server, bucket: str, key: str, size: int, block: bytes,
                     block_file: Path) -> dict:
    """Untimed: write through a mount via the recording proxy, describe its requests, and
    check every byte of the object it made."""
    from tests.support.proxy import S3Proxy

    with S3Proxy(server.endpoint) as proxy:
        directory, _, _ = mounts.mount(server, bucket, proxy.endpoint, "crt")
        proxy.clear()
        wrote = write_file(os.path.join(directory, key), size, block_file)
        records = proxy.records()
        max_parts_in_flight = proxy.max_in_flight("UploadPart")
        mounts.unmount(directory)
    parts = [r for r in records if r.op == "UploadPart"]
    close_at = wrote["close_started_at"]
    before_close = [r for r in parts if r.start < close_at]
    verified = verify_bytes(server, bucket, key, block, size)
    if not verified["verified"]:
        raise BenchError(f"wrong bytes in the object written through the mount: {verified}")
    return {
        "verified": True,
        "requests": dict(Counter(r.op for r in records)),
        "upload_parts": len(parts),
        "part_sizes": {_size_name(k): v for k, v in sorted(Counter(r.request_bytes for r in parts).items())},
        "max_parts_in_flight": max_parts_in_flight,
        "parts_sent_before_close": len(before_close),
        "parts_done_before_close": sum(1 for r in before_close if r.end is not None and r.end < close_at),
        "first_part_after_open_s": (round(min(r.start for r in parts) - wrote["opened_at"], 3)
                                    if parts else None),
        "close_called_after_open_s": round(close_at - wrote["opened_at"], 3),
        "close_s": round(wrote["close_s"], 3),
        # a HeadObject 404 is the lookup of the new name before it is created
        "errors": dict(Counter(f"{r.op} {r.status}" for r in records if r.status is None or r.status >= 400)),
        "mb_s_through_proxy": round(wrote["mb_s"], 1),
    }


# ------------------------------------------------------------------- checks
def head_size(server, bucket: str, key: str) -> int:
    return server.client().head_object(Bucket=bucket, Key=key)["ContentLength"]


def verify_bytes(server, bucket: str, key: str, block: bytes, size: int) -> dict:
    """Read the object back (boto3, straight from the server) and compare every byte."""
    body = server.client(read_timeout=120).get_object(Bucket=bucket, Key=key)["Body"]
    offset, mismatch = 0, None
    for chunk in body.iter_chunks(4 * MiB):
        if mismatch is None and not _same(memoryview(chunk), block, offset):
            mismatch = offset
        offset += len(chunk)
    return {"verified": mismatch is None and offset == size, "bytes": offset, "first_mismatch_at": mismatch}
