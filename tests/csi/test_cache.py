"""The `cache` mount option through the node server: each mount gets a directory of its
own under --cache-dir, made before its mount process starts and removed with the mount
(also when the process was killed), kept across a restart of the gRPC server; a reread
after the page cache is dropped comes from that directory, not from S3."""

from __future__ import annotations

import functools
import os
import signal
import stat
from pathlib import Path

import grpc
import pytest

from tests.csi.test_metrics import scrape, total
from tests.support.kubelet import Kubelet, NodeServer, capability, mounted
from tests.support.namespaces import alive, cmdline, mount_process
from tests.support.processes import wait_until
from tests.support.s3server import free_port

pytestmark = pytest.mark.s3_servers("seaweedfs")

MiB = 1024 * 1024
WAIT = 60.0  # bound of every wait
wait = functools.partial(wait_until, timeout=WAIT)
CACHED = ["cache", "max-cache-size=64MiB"]


@pytest.fixture
def cache_node(s3_server, tmp_path):
    """A node server with its own --cache-dir and metrics: (kubelet, cache dir, metrics port)."""
    port = free_port()
    cache_dir = tmp_path / "cache"
    server = NodeServer(root=tmp_path / "node", env=s3_server.env(),
                        extra_args=["--cache-dir", str(cache_dir),
                                    "--metrics-port", str(port), "--metrics-address", "127.0.0.1"]).start()
    kubelet = Kubelet(server)
    try:
        yield kubelet, cache_dir, port
    finally:
        kubelet.unpublish_all()
        server.stop()


def _cache_of(target: Path) -> Path | None:
    """The --cache directory of the mount process serving ``target``, if it has one."""
    pid = mount_process(target)
    assert pid is not None, f"no mount process for {target}"
    args = cmdline(pid)
    return Path(args[args.index(b"--cache") + 1].decode()) if b"--cache" in args else None


def _drop_page_cache() -> None:
    """Forget the file data the kernel keeps: the next read reaches the mount process."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as drop:
        drop.write("3")


def _reread_requests(proxy, port: int, target: Path, key: str, data: bytes) -> int:
    """Read ``key`` twice, with the page cache dropped in between; GetObjects of the second."""
    assert (target / key).read_bytes() == data
    assert proxy.count("GetObject") > 0
    if _cache_of(target) is not None:  # blocks reach the disk off the reading path
        wait(lambda: total(scrape(port), "pail_cache_bytes") >= len(data), "the file's blocks in the cache")
    _drop_page_cache()
    proxy.clear()
    assert (target / key).read_bytes() == data
    return proxy.count("GetObject")


def test_a_reread_comes_from_the_cache_and_the_directory_goes_with_the_mount(s3, bucket, proxy, cache_node):
    kubelet, cache_dir, port = cache_node
    data = os.urandom(5 * MiB + 12345)
    s3.put_object(Bucket=bucket, Key="data/train.bin", Body=data)
    attributes = {"bucketName": bucket, "endpoint": proxy.endpoint, "region": "us-east-1"}
    pod = kubelet.new_pod()
    target = kubelet.publish(pod, "pv-cached", attributes, cap=capability(flags=CACHED))
    cache = _cache_of(target)
    assert cache is not None and cache.parent == cache_dir
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700

    assert _reread_requests(proxy, port, target, "data/train.bin", data) == 0
    hits = total(scrape(port), "pail_cache_blocks_total", volume="pv-cached", result="hit")
    assert hits >= len(data) // MiB

    mounter = mount_process(target)
    kubelet.publish(pod, "pv-cached", attributes, cap=capability(flags=CACHED))  # republish: nothing to do
    assert mount_process(target) == mounter and _cache_of(target) == cache

    # A second pod's mount of the same volume has a cache of its own.
    other_pod = kubelet.new_pod("other")
    other = kubelet.publish(other_pod, "pv-cached", attributes, cap=capability(flags=CACHED))
    assert _cache_of(other) not in (None, cache) and _cache_of(other).parent == cache_dir

    kubelet.unpublish(pod, "pv-cached")
    assert not mounted(target) and not cache.exists()
    assert (other / "data/train.bin").read_bytes() == data
    kubelet.unpublish(other_pod, "pv-cached")
    assert list(cache_dir.iterdir()) == []


def test_without_the_option_a_reread_goes_to_s3(s3, bucket, proxy, cache_node):
    """What the test above measures: the same reread, uncached, fetches the file again."""
    kubelet, cache_dir, port = cache_node
    data = os.urandom(5 * MiB)
    s3.put_object(Bucket=bucket, Key="f.bin", Body=data)
    attributes = {"bucketName": bucket, "endpoint": proxy.endpoint, "region": "us-east-1"}
    target = kubelet.publish(kubelet.new_pod(), "pv-plain", attributes)
    assert _cache_of(target) is None
    assert _reread_requests(proxy, port, target, "f.bin", data) > 0
    assert list(cache_dir.iterdir()) == []


def _publish_and_read(s3, bucket, endpoint, cache_node, volume):
    """Publish a cached volume to a new pod, read a file of it and wait (bounded) until its
    blocks are in the cache; returns the pod, target, attributes and the file's bytes."""
    kubelet, _, port = cache_node
    data = os.urandom(3 * MiB)
    s3.put_object(Bucket=bucket, Key="f.bin", Body=data)
    attributes = {"bucketName": bucket, "endpoint": endpoint, "region": "us-east-1"}
    pod = kubelet.new_pod()
    target = kubelet.publish(pod, volume, attributes, cap=capability(flags=CACHED))
    assert (target / "f.bin").read_bytes() == data
    wait(lambda: total(scrape(port), "pail_cache_bytes") >= len(data), "the file's blocks in the cache")
    return pod, target, attributes, data


def test_a_killed_mount_leaves_its_blocks_until_unpublish(s3, bucket, cache_node, s3_server):
    """A mount process empties its cache as it ends; killed, it cannot, and the node server
    removes the directory instead (on unpublish, or on the republish that repairs it)."""
    kubelet, cache_dir, port = cache_node
    pod, target, attributes, data = _publish_and_read(s3, bucket, s3_server.endpoint, cache_node, "pv-killed")
    cache = _cache_of(target)
    mounter = mount_process(target)
    os.kill(mounter, signal.SIGKILL)
    wait(lambda: not alive(mounter), "the mount process dies")
    assert sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()) >= len(data), "blocks left behind"

    kubelet.publish(pod, "pv-killed", attributes, cap=capability(flags=CACHED))  # repairs the dead mount
    assert mount_process(target) not in (None, mounter) and _cache_of(target) == cache
    assert (target / "f.bin").read_bytes() == data
    os.kill(mount_process(target), signal.SIGKILL)
    kubelet.unpublish(pod, "pv-killed")
    assert not mounted(target) and not cache.exists()


def test_a_restarted_server_keeps_the_cache_of_an_adopted_mount(s3, bucket, proxy, cache_node):
    kubelet, cache_dir, port = cache_node
    pod, target, attributes, data = _publish_and_read(s3, bucket, proxy.endpoint, cache_node, "pv-adopted")
    cache = _cache_of(target)
    # What a server that died mid-publish leaves: a directory of no recorded mount. Only
    # names the node server makes are its to remove.
    orphan = cache_dir / ("0" * 32)
    (orphan / "pail-cache").mkdir(parents=True)
    (cache_dir / "someone-elses").mkdir()

    server = kubelet.server
    old = server.grpc_server_pid()
    os.kill(old, signal.SIGTERM)
    wait(lambda: server.grpc_server_pid() not in (None, old) and server.answers_probe(), "a new server answers Probe")
    assert [(e["kept"], e["cleaned"]) for e in server.events("mounts adopted")] == [(0, 0), (1, 0)]
    assert not orphan.exists() and (cache_dir / "someone-elses").exists()
    assert cache.exists() and _cache_of(target) == cache

    kubelet = Kubelet(server)  # a new connection, as kubelet's after a restart
    kubelet.publish(pod, "pv-adopted", attributes, cap=capability(flags=CACHED))  # republish: nothing to do
    _drop_page_cache()
    proxy.clear()
    assert (target / "f.bin").read_bytes() == data
    assert proxy.count("GetObject") == 0, "the adopted mount still reads from its cache"
    kubelet.unpublish(pod, "pv-adopted")
    assert not cache.exists()
    (cache_dir / "someone-elses").rmdir()


def test_the_default_cache_dir_is_in_the_state_dir(s3, bucket, kubelet, attributes):
    s3.put_object(Bucket=bucket, Key="a.txt", Body=b"a")
    pod = kubelet.new_pod()
    target = kubelet.publish(pod, "pv-default", attributes, cap=capability(flags=["cache"]))
    cache = _cache_of(target)
    assert cache.parent == kubelet.server.state_dir / "cache"
    assert (target / "a.txt").read_bytes() == b"a"
    kubelet.unpublish(pod, "pv-default")
    assert not cache.exists()


def test_the_cache_dir_must_be_absolute(s3_server, tmp_path):
    server = NodeServer(root=tmp_path / "node", env=s3_server.env(), extra_args=["--cache-dir", "cache"])
    with pytest.raises(RuntimeError) as error:
        server.start()
    assert "--cache-dir" in str(error.value) and "absolute" in str(error.value)


def test_caches_past_the_nodes_capacity_are_refused_and_mount_nothing(s3_server, s3, bucket, tmp_path):
    # 150 MiB: two caches of 64 MiB fit (with their overhead), a third does not.
    server = NodeServer(root=tmp_path / "node", env=s3_server.env(),
                        extra_args=["--cache-capacity", "150Mi"]).start()
    kubelet = Kubelet(server)
    try:
        s3.put_object(Bucket=bucket, Key="a.txt", Body=b"a")
        attributes = {"bucketName": bucket, "endpoint": s3_server.endpoint, "region": "us-east-1"}
        first, second, third = kubelet.new_pod(), kubelet.new_pod(), kubelet.new_pod()
        for pod in (first, second):
            kubelet.publish(pod, "pv-cached", attributes, cap=capability(flags=CACHED))
        kubelet.publish(first, "pv-cached", attributes, cap=capability(flags=CACHED))  # a republish takes nothing more
        kubelet.publish(third, "pv-plain", attributes)  # no cache: no capacity needed
        with pytest.raises(grpc.RpcError) as error:
            kubelet.publish(third, "pv-cached", attributes, cap=capability(flags=CACHED))
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max-cache-size" in error.value.details() and "--cache-capacity" in error.value.details()
        assert not mounted(kubelet.target(third, "pv-cached"))

        # After a restart the records still count: the same refusal.
        old = server.grpc_server_pid()
        os.kill(old, signal.SIGTERM)
        wait(lambda: server.grpc_server_pid() not in (None, old) and server.answers_probe(), "a new server answers Probe")
        kubelet = Kubelet(server)
        with pytest.raises(grpc.RpcError) as error:
            kubelet.publish(third, "pv-cached", attributes, cap=capability(flags=CACHED))
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

        kubelet.unpublish(first, "pv-cached")  # its share is free again
        target = kubelet.publish(third, "pv-cached", attributes, cap=capability(flags=CACHED))
        assert (target / "a.txt").read_bytes() == b"a"
    finally:
        Kubelet(server).unpublish_all()
        server.stop()


def test_the_cache_capacity_must_be_a_quantity(s3_server, tmp_path):
    server = NodeServer(root=tmp_path / "node", env=s3_server.env(), extra_args=["--cache-capacity", "lots"])
    with pytest.raises(RuntimeError) as error:
        server.start()
    assert "--cache-capacity" in str(error.value)
