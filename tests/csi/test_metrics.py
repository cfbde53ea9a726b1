"""The node's /metrics: a scripted workload through a published volume, and the counters'
deltas compared with what the recording proxy saw."""

from __future__ import annotations

import os
import re
import time
import urllib.request

import pytest

from tests.support.kubelet import Kubelet, NodeServer
from tests.support.mounts import random_reader_of_a_slow_store, resident_bytes
from tests.support.processes import wait_until
from tests.support.s3server import free_port

pytestmark = pytest.mark.s3_servers("seaweedfs")

KiB, MiB = 1024, 1024 * 1024
BLOCK = 8 * MiB  # a block fill's size: the largest request


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """Samples by (name, sorted labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        match = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)", line)
        if match and not line.startswith("#"):
            labels = tuple(sorted(re.findall(r'(\w+)="([^"]*)"', match.group(2) or "")))
            samples[(match.group(1), labels)] = float(match.group(3))
    return samples


def total(samples, name: str, **want: str) -> float:
    return sum(value for (sample, labels), value in samples.items()
               if sample == name and all((k, v) in labels for k, v in want.items()))


@pytest.fixture
def metrics_node(s3_server, tmp_path):
    port = free_port()
    server = NodeServer(root=tmp_path / "node", env=s3_server.env(),
                        extra_args=["--metrics-port", str(port), "--metrics-address", "127.0.0.1"]).start()
    kubelet = Kubelet(server)
    try:
        yield kubelet, port
    finally:
        kubelet.unpublish_all()
        server.stop()


def test_counters_match_the_requests_and_bytes_of_a_workload(s3, bucket, proxy, metrics_node):
    kubelet, port = metrics_node
    files = {f"data/f{i}": os.urandom(100 * KiB + i) for i in range(5)}
    for key, body in files.items():
        s3.put_object(Bucket=bucket, Key=key, Body=body)
    pod = kubelet.new_pod()
    target = kubelet.publish(pod, "pv-metrics", {"bucketName": bucket, "endpoint": proxy.endpoint,
                                                 "region": "us-east-1"})
    before = scrape(port)
    proxy.clear()

    listed = sorted(os.listdir(target / "data"))
    read = {f"data/{name}": (target / "data" / name).read_bytes() for name in listed}
    (target / "out.bin").write_bytes(b"x" * 300 * KiB)
    with pytest.raises(FileNotFoundError):
        (target / "missing").read_bytes()
    assert read == files

    def seen_and_counted():
        records = proxy.records()
        after = scrape(port)
        seen = {}
        for record in records:
            seen[(record.op, str(record.status))] = seen.get((record.op, str(record.status)), 0) + 1
        counted = {(dict(labels)["operation"], dict(labels)["status"]): value - before.get((name, labels), 0)
                   for (name, labels), value in after.items() if name == "pail_s3_requests_total"}
        return records, after, seen, {k: v for k, v in counted.items() if v}

    # Every S3 request the mount sent, by operation and status, and none other. A request
    # nobody waits for (a directory listed after several names were looked up in it) may
    # still be finishing: its count follows the proxy's record within a bound.
    deadline = time.monotonic() + 10
    records, after, seen, counted = seen_and_counted()
    while counted != seen and time.monotonic() < deadline:
        time.sleep(0.1)
        records, after, seen, counted = seen_and_counted()
    assert counted == seen

    def delta(name, **labels):
        return total(after, name, **labels) - total(before, name, **labels)

    assert delta("pail_s3_request_duration_seconds_count") == len(records)
    assert all(dict(labels).get("volume") == "pv-metrics"
               for (name, labels) in after if name.startswith("pail_s3_requests"))
    # Bytes through the mount, both ways.
    assert delta("pail_read_bytes_total") == sum(map(len, files.values()))
    assert delta("pail_written_bytes_total") == 300 * KiB
    # Operations by errno: the missing file's lookup, and the reads of the files.
    assert delta("pail_fuse_operations_total", operation="lookup", errno="ENOENT") >= 1
    assert delta("pail_fuse_operations_total", operation="read", errno="OK") >= len(files)
    assert delta("pail_prefetch_reads_total") >= len(files)
    # Everything was closed (the kernel sends the last release after close() returns).
    deadline = time.monotonic() + 10
    while total(scrape(port), "pail_open_handles") != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert total(scrape(port), "pail_open_handles") == 0
    assert total(after, "pail_mounts", state="running") == 1

    # A second mount on the node: one scrape shows both volumes.
    kubelet.publish(kubelet.new_pod(), "pv-other", {"bucketName": bucket, "endpoint": proxy.endpoint,
                                                    "region": "us-east-1"})
    both = scrape(port)
    assert total(both, "pail_mounts", state="running") == 2
    assert {dict(labels).get("volume") for (name, labels) in both if name == "pail_s3_requests_total"} \
        == {"pv-metrics", "pv-other"}


def test_a_volumes_series_end_when_it_is_unpublished(s3, bucket, metrics_node, s3_server):
    kubelet, port = metrics_node
    s3.put_object(Bucket=bucket, Key="a.txt", Body=b"a")
    pod = kubelet.new_pod()
    attributes = {"bucketName": bucket, "endpoint": s3_server.endpoint, "region": "us-east-1"}
    target = kubelet.publish(pod, "pv-gone", attributes)
    assert (target / "a.txt").read_bytes() == b"a"
    assert any(dict(labels).get("volume") == "pv-gone" for (_, labels) in scrape(port))
    kubelet.unpublish(pod, "pv-gone")
    after = scrape(port)
    assert not any(dict(labels).get("volume") == "pv-gone" for (_, labels) in after)
    assert total(after, "pail_mounts") == 0


def test_a_block_fetched_whole_into_the_page_cache_is_counted(s3, bucket, proxy, metrics_node):
    """Random reads against a store 30 ms away that come back to one block: the block is
    fetched once, whole, handed to the page cache, and counted in pail_block_fills_total."""
    kubelet, port = metrics_node
    data = os.urandom(64 * MiB)
    s3.put_object(Bucket=bucket, Key="big", Body=data)
    target = kubelet.publish(kubelet.new_pod(), "pv-fill", {"bucketName": bucket, "endpoint": proxy.endpoint,
                                                            "region": "us-east-1"})
    path = target / "big"
    os.stat(path)
    before = scrape(port)
    proxy.clear()
    # Reads in four other blocks first (fills start once random reads have waited on S3),
    # then two in block 3, each before the last so that none looks sequential.
    offsets = [b * BLOCK + MiB for b in (7, 6, 1, 0)] + [3 * BLOCK + 7 * MiB, 3 * BLOCK + 2 * MiB]
    with random_reader_of_a_slow_store(proxy, path) as f:
        for offset in offsets:
            assert os.pread(f.fileno(), 256 * KiB, offset) == data[offset:offset + 256 * KiB]
        wait_until(lambda: resident_bytes(path) >= BLOCK, "the block in the page cache", timeout=30)

    def fills() -> float:
        return total(scrape(port), "pail_block_fills_total") - total(before, "pail_block_fills_total")
    wait_until(lambda: fills() >= 1, "a block fill counted", timeout=30)
    assert fills() == 1
    whole = [r.range for r in proxy.records("GetObject") if r.range[1] + 1 - r.range[0] == BLOCK]
    assert whole == [(3 * BLOCK, 4 * BLOCK - 1)]
