"""The objects bench.compare reads, made once per benchmark run.

Layout in the bucket (only what the selected workloads need is made):

    bench/seq-read.bin        the large object (--size-mib): sequential and random reads, rereads, TTFB
    parallel/obj-N.bin        4 more of the same size, one per parallel reader
    list/obj-NNNNN            --list-objects objects of 1 KiB: the directory ls -l lists
    small/file-NNNN.bin       --small-files files of 64 KiB: the files cat reads

Large objects are a random 64 MiB block repeated (``block`` of the Dataset; offset o holds
block[o % len(block)], which is how readers check bytes). SeaweedFS does not deduplicate,
and random bytes keep it from compressing. The small ones go in through SeaweedFS's filer
(tests.support.s3server put_many), 10x faster than signed S3 PUTs and the same objects to S3.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.clients import KEY
from bench.system import MB, BenchError, MiB
from bench.writes import raw_awscrt as put_object

BLOCK_SIZE = 64 * MiB
PARALLEL_READERS = 4
LIST_PREFIX = "list"
LIST_OBJECT_SIZE = 1024
SMALL_PREFIX = "small"
SMALL_FILE_SIZE = 64 * 1024


@dataclass
class Dataset:
    bucket: str
    size: int  # bytes of each large object
    list_objects: int
    small_files: int
    block: bytes
    block_file: Path  # the block, for child processes that check bytes
    small_body: bytes = b""
    big_key: str = KEY
    parallel_keys: list[str] = field(default_factory=lambda: [f"parallel/obj-{n}.bin"
                                                              for n in range(PARALLEL_READERS)])
    upload: dict = field(default_factory=dict)  # what making it cost, for the record

    @property
    def list_keys(self) -> list[str]:
        return [f"{LIST_PREFIX}/obj-{n:05d}" for n in range(self.list_objects)]

    @property
    def small_keys(self) -> list[str]:
        return [f"{SMALL_PREFIX}/file-{n:04d}.bin" for n in range(self.small_files)]

    def describe(self) -> dict:
        return {"bucket": self.bucket, "size_bytes": self.size, "size_mib": self.size // MiB,
                "big_key": self.big_key, "parallel_keys": self.parallel_keys,
                "list_prefix": LIST_PREFIX + "/", "list_objects": self.list_objects,
                "list_object_size": LIST_OBJECT_SIZE, "small_prefix": SMALL_PREFIX + "/",
                "small_files": self.small_files, "small_file_size": SMALL_FILE_SIZE,
                "random_block": len(self.block), "upload": self.upload}


def make(server, bucket: str, workdir: Path, size: int, list_objects: int, small_files: int,
         workloads: set[str], say) -> Dataset:
    block = os.urandom(min(BLOCK_SIZE, size))
    block_file = workdir / "block.bin"
    block_file.write_bytes(block)
    data = Dataset(bucket, size, list_objects, small_files, block, block_file,
                   small_body=os.urandom(SMALL_FILE_SIZE))
    big = [data.big_key] if workloads & {"seq_read", "reread", "rand_read_1t", "rand_read_4t", "rand_read_shared",
                                           "ttfb"} else []
    if "parallel_read" in workloads:
        big += data.parallel_keys
    for key in big:
        say(f"uploading {key} ({size // MiB} MiB)")
        done = put_object(server, bucket, key, block, size)
        data.upload[key] = {"seconds": round(done["seconds"], 2), "mb_s": round(done["mb_s"], 1)}
    for name, keys, body in (("list", data.list_keys, os.urandom(LIST_OBJECT_SIZE)),
                             ("cat_small", data.small_keys, data.small_body)):
        if name in workloads and keys:
            say(f"putting {len(keys)} objects of {len(body)} bytes under {keys[0].split('/')[0]}/")
            t0 = time.perf_counter()
            server.put_many(bucket, keys, body=body, threads=16)
            data.upload[name] = {"objects": len(keys), "seconds": round(time.perf_counter() - t0, 2)}
    _check(server, data, big, workloads)
    return data


def _check(server, data: Dataset, big: list[str], workloads: set[str]) -> None:
    client = server.client()
    for key in big:
        length = client.head_object(Bucket=data.bucket, Key=key)["ContentLength"]
        if length != data.size:
            raise BenchError(f"{key} has {length} bytes, expected {data.size}")
    for name, prefix, count in (("list", LIST_PREFIX, data.list_objects),
                                ("cat_small", SMALL_PREFIX, data.small_files)):
        if name in workloads:
            listed = sum(page.get("KeyCount", 0) for page in client.get_paginator("list_objects_v2").paginate(
                Bucket=data.bucket, Prefix=prefix + "/"))
            if listed != count:
                raise BenchError(f"{prefix}/ lists {listed} objects, expected {count}")


def mb_s(size: int, seconds: float) -> float:
    return size / seconds / MB if seconds > 0 else 0.0
