"""Many volumes on one node server: published at once, used, unpublished at once."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import pytest

from driver.csi.mounts import process_alive
from tests.support.kubelet import mounted
from tests.support.processes import proc_status_bytes

KiB, MiB = 1024, 1024 * 1024
VOLUMES = 20
DEADLINE = 100.0  # seconds for all publishes (or unpublishes) together; each call has 90


def _pss(pid: int) -> int:
    """Proportional set size: shared pages (the interpreter, libraries) split between the
    processes that map them, so the sum over processes is what they cost together."""
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        for line in rollup:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * KiB
    raise AssertionError("no Pss")


def _all_done(futures, what: str) -> list:
    _, pending = wait(futures, timeout=DEADLINE)
    assert not pending, f"{len(pending)} of {len(futures)} {what} calls unanswered after {DEADLINE:.0f} s"
    return [f.result() for f in futures]  # raises the first error


@pytest.mark.s3_servers("seaweedfs")
def test_twenty_volumes_published_and_unpublished_at_once(s3, bucket, kubelet, attributes):
    server = kubelet.server
    log_start = len(server.log())
    volumes = [f"pv-load-{i:02d}" for i in range(VOLUMES)]
    for i, pv in enumerate(volumes):
        s3.put_object(Bucket=bucket, Key=f"{pv}/hello.txt", Body=f"volume {i}\n".encode())
    pods = [kubelet.new_pod(f"app-{i}") for i in range(VOLUMES)]
    requests = [kubelet.publish_request(pod, pv, {**attributes, "prefix": f"{pv}/"})
                for pod, pv in zip(pods, volumes)]
    targets = [Path(r.target_path) for r in requests]

    def publish(request) -> float:
        began = time.monotonic()
        kubelet.stub.NodePublishVolume(request, timeout=90)
        return time.monotonic() - began

    pool = ThreadPoolExecutor(VOLUMES)
    try:
        began = time.monotonic()
        latencies = _all_done([pool.submit(publish, r) for r in requests], "NodePublishVolume")
        publish_time = time.monotonic() - began

        assert all(mounted(t) for t in targets)
        for i, target in enumerate(targets):
            assert (target / "hello.txt").read_bytes() == f"volume {i}\n".encode(), "each volume its own prefix"
        records = [json.loads(p.read_text()) for p in server.state_dir.glob("mounts/*.json")]
        assert sorted(r["target"] for r in records) == sorted(map(str, targets))
        pids = [r["pid"] for r in records]
        assert len(set(pids)) == VOLUMES, "one mount process per volume"
        rss = [proc_status_bytes(pid, "VmRSS") for pid in pids]
        pss = [_pss(pid) for pid in pids]

        def unpublish(i: int) -> None:
            kubelet.unpublish(pods[i], volumes[i])

        began = time.monotonic()
        _all_done([pool.submit(unpublish, i) for i in range(VOLUMES)], "NodeUnpublishVolume")
        unpublish_time = time.monotonic() - began
    finally:
        pool.shutdown(wait=False, cancel_futures=True)

    prefix = f"{server.kubelet_dir}/pods/"
    with open("/proc/self/mountinfo") as mountinfo:
        left = [line.split()[4] for line in mountinfo if line.split()[4].startswith(prefix)]
    assert not left, f"still mounted: {left}"
    assert not any(t.exists() for t in targets), "the driver removes the targets it made"
    assert not [pid for pid in pids if process_alive(pid)], "every mount process ended"
    assert not list(server.state_dir.glob("mounts/*.json")), "no records left"
    assert not list(server.state_dir.glob("credentials/*")), "no credentials left"
    assert server.running
    # The server's log holds the mount processes' too (their stderr is the server's).
    events = [json.loads(line) for line in server.log()[log_start:].splitlines() if line.startswith("{")]
    trouble = [e for e in events if e.get("level") in ("warning", "error", "critical")]
    assert not trouble, trouble[:3]

    print(f"\n{VOLUMES} volumes on one node server: published at once in {publish_time:.1f} s "
          f"(each call {min(latencies):.1f}-{max(latencies):.1f} s), unpublished at once in {unpublish_time:.1f} s; "
          f"mount processes after one small read: RSS {min(rss) / MiB:.0f}-{max(rss) / MiB:.0f} MiB each, "
          f"{sum(rss) / MiB:.0f} MiB summed; PSS {sum(pss) / VOLUMES / MiB:.0f} MiB each on average, "
          f"{sum(pss) / MiB:.0f} MiB in all")
