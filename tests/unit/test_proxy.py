"""Tests of the test infrastructure: real S3 servers and the recording, fault-injecting proxy."""

from __future__ import annotations

import hashlib
import io
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import botocore.exceptions
import pytest

from tests.support.proxy import Headers, Reset, S3Proxy, Stall, Status, classify, parse_range
from tests.support.s3server import S3Server, start_moto

MiB = 1024 * 1024
NO_RETRY = {"total_max_attempts": 1, "mode": "standard"}


def _client(server: S3Server, proxy: S3Proxy, **config):
    return server.client(endpoint_url=proxy.endpoint, **config)


def _run_in_thread(fn, *args, **kwargs):
    """Start fn in a thread; return (thread, result dict with 'value' or 'error')."""
    result: dict = {}

    def target():
        try:
            result["value"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001
            result["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, result


# ----------------------------------------------------------------- the servers
def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            link = os.readlink(fd)
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    return inodes


def _inet_sockets(pid: int) -> list[tuple[str, str, str, str]]:
    """(proto, local ip, remote ip, state) for the process's TCP/UDP sockets."""
    inodes = _socket_inodes(pid)
    out = []
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        path = Path(f"/proc/{pid}/net/{proto}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            f = line.split()
            if f[9] not in inodes:
                continue
            out.append((proto, _hex_ip(f[1].split(":")[0]), _hex_ip(f[2].split(":")[0]), f[3]))
    return out


def _hex_ip(h: str) -> str:
    raw = bytes.fromhex(h)
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    return socket.inet_ntop(socket.AF_INET6, words)


def test_server_uses_only_loopback(s3_server, s3, bucket):
    s3.put_object(Bucket=bucket, Key="k", Body=b"v")  # make it open its inner connections
    socks = _inet_sockets(s3_server.process.pid)
    listening = [s for s in socks if s[3] == "0A"]
    assert listening, socks
    for proto, local, remote, _state in socks:
        assert proto in ("tcp", "udp") and local == "127.0.0.1", socks
        assert remote in ("127.0.0.1", "0.0.0.0"), socks


@pytest.mark.s3_servers("seaweedfs")
def test_seaweedfs_checks_signatures(s3_server, bucket):
    assert s3_server.checks_signatures
    bad = S3Server(**{**s3_server.__dict__, "secret_key": "wrong", "process": None})
    with pytest.raises(botocore.exceptions.ClientError) as e:
        bad.client(retries=NO_RETRY).head_bucket(Bucket=bucket)
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


def test_moto_min_part_size(tmp_path, moto_server):
    def two_small_parts(client, bucket):
        up = client.create_multipart_upload(Bucket=bucket, Key="mp")["UploadId"]
        parts = [
            {"PartNumber": n, "ETag": client.upload_part(
                Bucket=bucket, Key="mp", UploadId=up, PartNumber=n, Body=bytes([n]) * 1024)["ETag"]}
            for n in (1, 2)
        ]
        client.complete_multipart_upload(
            Bucket=bucket, Key="mp", UploadId=up, MultipartUpload={"Parts": parts})
        return client.get_object(Bucket=bucket, Key="mp")["Body"].read()

    # the session server keeps S3's 5 MiB minimum ...
    with pytest.raises(botocore.exceptions.ClientError, match="EntityTooSmall"):
        two_small_parts(moto_server.client(retries=NO_RETRY), moto_server.create_bucket())
    # ... and min_part_size lowers it.
    server = start_moto(tmp_path, min_part_size=1024)
    try:
        assert two_small_parts(server.client(), server.create_bucket()) == b"\x01" * 1024 + b"\x02" * 1024
    finally:
        server.stop()
        server.stop()  # idempotent
    assert not server.running


# ----------------------------------------------------------- recording & classes
def test_records_and_classifies(s3_server, bucket, proxy):
    c = _client(s3_server, proxy)
    c.list_buckets()
    c.head_bucket(Bucket=bucket)
    c.get_bucket_location(Bucket=bucket)
    c.put_object(Bucket=bucket, Key="dir/a b+ü.txt", Body=b"0123456789")
    c.put_object(Bucket=bucket, Key="dir/two", Body=b"x" * 100)
    c.list_objects_v2(Bucket=bucket, Prefix="dir/", Delimiter="/")
    c.list_objects(Bucket=bucket)
    assert c.get_object(Bucket=bucket, Key="dir/a b+ü.txt", Range="bytes=2-5")["Body"].read() == b"2345"
    c.get_object(Bucket=bucket, Key="dir/two", Range="bytes=90-")["Body"].read()
    c.head_object(Bucket=bucket, Key="dir/two")
    c.copy_object(Bucket=bucket, Key="dir/copy", CopySource={"Bucket": bucket, "Key": "dir/two"})
    c.delete_object(Bucket=bucket, Key="dir/copy")
    c.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": "dir/two"}]})

    ops = [r.op for r in proxy.records()]
    assert ops == [
        "ListBuckets", "HeadBucket", "GetBucketLocation", "PutObject", "PutObject",
        "ListObjectsV2", "ListObjects", "GetObject", "GetObject", "HeadObject", "CopyObject",
        "DeleteObject", "DeleteObjects",
    ]
    assert all(r.done and r.forwarded and r.fault is None for r in proxy.records())
    assert proxy.count() == len(ops) and proxy.count("PutObject") == 2

    get1, get2 = proxy.records("GetObject")
    assert (get1.bucket, get1.key, get1.range, get1.status, get1.response_bytes) == (
        bucket, "dir/a b+ü.txt", (2, 5), 206, 4)
    assert (get2.range, get2.status, get2.response_bytes) == ((90, None), 206, 10)
    assert get1.request_headers["range"] == "bytes=2-5"
    assert get1.request_headers["Host"] == proxy.endpoint.removeprefix("http://")
    assert get1.start <= get1.end and get1.in_flight_at_start == 1
    put = proxy.records("PutObject")[0]
    assert put.request_bytes >= 10 and put.key == "dir/a b+ü.txt"
    lst = proxy.records("ListObjectsV2")[0]
    assert lst.query["prefix"] == "dir/" and lst.query["delimiter"] == "/" and lst.key is None
    assert lst.response_bytes > 0 and lst.status == 200
    assert proxy.records("HeadObject")[0].response_bytes == 0

    proxy.clear()
    assert proxy.records() == [] and proxy.count() == 0


def test_multipart_upload_classified(s3_server, bucket, proxy):
    c = _client(s3_server, proxy)
    part1 = os.urandom(5 * MiB)
    up = c.create_multipart_upload(Bucket=bucket, Key="mp")["UploadId"]
    e1 = c.upload_part(Bucket=bucket, Key="mp", UploadId=up, PartNumber=1, Body=part1)["ETag"]
    e2 = c.upload_part(Bucket=bucket, Key="mp", UploadId=up, PartNumber=2, Body=b"tail")["ETag"]
    assert [u["UploadId"] for u in c.list_multipart_uploads(Bucket=bucket).get("Uploads", [])] == [up]
    c.complete_multipart_upload(Bucket=bucket, Key="mp", UploadId=up, MultipartUpload={
        "Parts": [{"PartNumber": 1, "ETag": e1}, {"PartNumber": 2, "ETag": e2}]})
    up2 = c.create_multipart_upload(Bucket=bucket, Key="mp2")["UploadId"]
    c.abort_multipart_upload(Bucket=bucket, Key="mp2", UploadId=up2)

    assert [r.op for r in proxy.records()] == [
        "CreateMultipartUpload", "UploadPart", "UploadPart", "ListMultipartUploads",
        "CompleteMultipartUpload", "CreateMultipartUpload", "AbortMultipartUpload",
    ]
    parts = proxy.records("UploadPart")
    assert [r.query["partNumber"] for r in parts] == ["1", "2"]
    assert parts[0].query["uploadId"] == up and parts[0].request_bytes >= 5 * MiB
    assert all(r.status in (200, 204) for r in proxy.records()), [(r.op, r.status) for r in proxy.records()]
    assert c.get_object(Bucket=bucket, Key="mp")["Body"].read() == part1 + b"tail"


def test_signed_chunked_upload_through_proxy(s3_server, bucket, proxy):
    """boto3 file-like bodies go as aws-chunked, Transfer-Encoding: chunked, Expect:
    100-continue; SeaweedFS verifies the signatures of head and chunks."""
    c = _client(s3_server, proxy)
    data = os.urandom(3 * MiB + 17)
    c.upload_fileobj(io.BytesIO(data), bucket, "odd key/ä+&=.bin")
    put = proxy.records("PutObject")[-1]
    assert put.request_headers.get("expect") == "100-continue"
    assert put.status == 200 and put.request_bytes >= len(data)
    assert c.get_object(Bucket=bucket, Key="odd key/ä+&=.bin")["Body"].read() == data
    if s3_server.checks_signatures:
        bad = S3Server(**{**s3_server.__dict__, "secret_key": "wrong", "process": None})
        with pytest.raises(botocore.exceptions.ClientError) as e:
            _client(bad, proxy, retries=NO_RETRY).get_object(Bucket=bucket, Key="odd key/ä+&=.bin")
        assert e.value.response["Error"]["Code"] == "SignatureDoesNotMatch"
        assert proxy.records()[-1].status == 403


# --------------------------------------------------------------------- faults
def test_status_fault(s3_server, bucket, proxy):
    s3_server.client().put_object(Bucket=bucket, Key="k", Body=b"value")
    c = _client(s3_server, proxy, retries=NO_RETRY)
    h = proxy.inject(Status(503, "SlowDown"), op="GetObject")
    with pytest.raises(botocore.exceptions.ClientError) as e:
        c.get_object(Bucket=bucket, Key="k")
    assert e.value.response["Error"]["Code"] == "SlowDown"
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    assert h.hits == 1 and not h.active
    assert c.get_object(Bucket=bucket, Key="k")["Body"].read() == b"value"
    failed, ok = proxy.records("GetObject")
    assert (failed.status, failed.fault, failed.forwarded) == (503, "Status(503,SlowDown)", False)
    assert (ok.status, ok.fault, ok.forwarded) == (200, None, True)

    proxy.inject(Status(500), op="HeadObject", times=2)
    for _ in range(2):
        with pytest.raises(botocore.exceptions.ClientError) as e:
            c.head_object(Bucket=bucket, Key="k")
        assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 500
    c.head_object(Bucket=bucket, Key="k")

    # an upload answered early: the body (sent after our 100 Continue) is drained
    proxy.inject(Status(503, "SlowDown"), op="PutObject")
    with pytest.raises(botocore.exceptions.ClientError, match="SlowDown"):
        c.put_object(Bucket=bucket, Key="p", Body=b"p" * 100_000)
    c.put_object(Bucket=bucket, Key="p", Body=b"p" * 100_000)
    assert [(r.status, r.request_bytes >= 100_000) for r in proxy.records("PutObject")] == [
        (503, True), (200, True)]

    # With retries on, one injected 500 is absorbed by the client's retry.
    proxy.inject(Status(500, "InternalError"), op="GetObject")
    retrying = _client(s3_server, proxy, retries={"total_max_attempts": 2, "mode": "standard"})
    assert retrying.get_object(Bucket=bucket, Key="k")["Body"].read() == b"value"
    assert [r.status for r in proxy.records("GetObject")][-2:] == [500, 200]


@pytest.mark.s3_servers("moto")
def test_fault_matching_order_and_clear(s3_server, bucket, proxy):
    s3 = s3_server.client()
    for k in ("a", "b"):
        s3.put_object(Bucket=bucket, Key=k, Body=k.encode())
    c = _client(s3_server, proxy, retries=NO_RETRY)
    only_b = proxy.inject(Status(404, "NoSuchKey"), match=lambda r: r.key == "b", times=None)
    proxy.inject(Status(500), op="GetObject", times=None)
    with pytest.raises(botocore.exceptions.ClientError, match="NoSuchKey"):
        c.get_object(Bucket=bucket, Key="b")  # first match wins
    with pytest.raises(botocore.exceptions.ClientError, match="InternalError"):
        c.get_object(Bucket=bucket, Key="a")
    with pytest.raises(botocore.exceptions.ClientError, match="NoSuchKey"):
        c.get_object(Bucket=bucket, Key="b")
    assert only_b.hits == 2
    only_b.remove()
    with pytest.raises(botocore.exceptions.ClientError, match="InternalError"):
        c.get_object(Bucket=bucket, Key="b")
    proxy.clear_faults()
    assert c.get_object(Bucket=bucket, Key="b")["Body"].read() == b"b"
    assert proxy.faults() == []
    with pytest.raises(ValueError):
        proxy.inject(Status(500), after_bytes=10)
    with pytest.raises(ValueError):
        proxy.inject(Reset(), op="NoSuchOp")


def test_reset(s3_server, bucket, proxy):
    data = os.urandom(MiB)
    s3_server.client().put_object(Bucket=bucket, Key="k", Body=data)
    c = _client(s3_server, proxy, retries=NO_RETRY)

    proxy.inject(Reset(), op="GetObject")
    with pytest.raises(botocore.exceptions.BotoCoreError):
        c.get_object(Bucket=bucket, Key="k")
    assert proxy.records("GetObject")[-1].fault == "Reset"
    assert proxy.records("GetObject")[-1].forwarded is False

    proxy.inject(Reset(), op="GetObject", after_bytes=100_000)
    body = c.get_object(Bucket=bucket, Key="k")["Body"]
    with pytest.raises(botocore.exceptions.BotoCoreError):
        body.read()
    assert proxy.wait_for(lambda: proxy.records("GetObject")[-1].done)
    rec = proxy.records("GetObject")[-1]
    assert (rec.fault, rec.status, rec.response_bytes) == ("Reset", 200, 100_000)

    # the proxy keeps working
    assert c.get_object(Bucket=bucket, Key="k")["Body"].read() == data


def test_stall_holds_until_removed(s3_server, bucket, proxy):
    s3_server.client().put_object(Bucket=bucket, Key="k", Body=b"value")
    c = _client(s3_server, proxy, retries=NO_RETRY)
    h = proxy.inject(Stall(None), op="GetObject")
    t, res = _run_in_thread(lambda: c.get_object(Bucket=bucket, Key="k")["Body"].read())
    assert h.wait()
    assert proxy.in_flight("GetObject") == 1 and not proxy.records("GetObject")[0].done
    c.head_object(Bucket=bucket, Key="k")  # other requests pass meanwhile
    assert t.is_alive() and not res
    h.remove()
    t.join(30)
    assert res == {"value": b"value"}
    assert proxy.records("GetObject")[0].fault == "Stall"

    # a timed stall ends by itself
    proxy.inject(Stall(0.2), op="GetObject")
    assert c.get_object(Bucket=bucket, Key="k")["Body"].read() == b"value"


def test_stall_mid_body(s3_server, bucket, proxy):
    data = os.urandom(2 * MiB)
    s3_server.client().put_object(Bucket=bucket, Key="k", Body=data)
    c = _client(s3_server, proxy, retries=NO_RETRY)
    h = proxy.inject(Stall(None), op="GetObject", after_bytes=MiB)
    t, res = _run_in_thread(lambda: c.get_object(Bucket=bucket, Key="k")["Body"].read())
    assert proxy.wait_for(lambda: [r.response_bytes for r in proxy.records("GetObject")] == [MiB], 20)
    assert t.is_alive()
    h.remove()
    t.join(30)
    assert res.get("value") == data
    rec = proxy.records("GetObject")[0]
    assert (rec.fault, rec.response_bytes) == ("Stall", 2 * MiB)


def test_concurrent_requests_counted(s3_server, bucket, proxy):
    data = os.urandom(64 * 1024)
    s3_server.client().put_object(Bucket=bucket, Key="k", Body=data)
    c = _client(s3_server, proxy, retries=NO_RETRY)
    c.head_object(Bucket=bucket, Key="k")
    assert proxy.max_in_flight("GetObject") == 0
    h = proxy.inject(Stall(None), op="GetObject", times=None)

    def ranged(i):
        return c.get_object(Bucket=bucket, Key="k", Range=f"bytes={i * 1024}-{i * 1024 + 1023}")["Body"].read()

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(ranged, i) for i in range(8)]
        assert proxy.wait_for(lambda: proxy.in_flight("GetObject") == 8, 20), proxy.records()
        assert not any(f.done() for f in futures)
        h.remove()
        results = [f.result(30) for f in futures]
    assert results == [data[i * 1024 : (i + 1) * 1024] for i in range(8)]
    recs = proxy.records("GetObject")
    assert sorted(r.in_flight_at_start for r in recs) == list(range(1, 9))
    assert sorted(r.range for r in recs) == [(i * 1024, i * 1024 + 1023) for i in range(8)]
    assert proxy.max_in_flight("GetObject") == 8 and proxy.max_in_flight("HeadObject") == 1
    proxy.clear()
    assert proxy.max_in_flight("GetObject") == 0
    c.get_object(Bucket=bucket, Key="k")["Body"].read()
    assert proxy.max_in_flight("GetObject") == 1
    assert proxy.records("GetObject")[0].in_flight_at_start == 1


@pytest.mark.s3_servers("seaweedfs")
def test_many_keepalive_connections(s3_server, bucket, proxy):
    s3_server.client().put_object(Bucket=bucket, Key="k", Body=b"v" * 4096)
    c = _client(s3_server, proxy, max_pool_connections=80)
    gate = proxy.inject(Stall(None), op="HeadObject", times=None)
    with ThreadPoolExecutor(72) as pool:
        futures = [pool.submit(c.head_object, Bucket=bucket, Key="k") for _ in range(72)]
        assert proxy.wait_for(lambda: proxy.in_flight("HeadObject") == 72, 20), proxy.in_flight()
        gate.remove()
        assert all(f.result(30)["ContentLength"] == 4096 for f in futures)
        # the same connections are reused for the next round
        futures = [pool.submit(lambda: c.get_object(Bucket=bucket, Key="k")["Body"].read()) for _ in range(200)]
        assert all(f.result(30) == b"v" * 4096 for f in futures)
    assert proxy.max_in_flight("HeadObject") == 72
    assert proxy.count("GetObject") == 200


def test_large_object_round_trip(s3_server, bucket, proxy):
    data = os.urandom(64 * MiB)
    c = _client(s3_server, proxy)
    from boto3.s3.transfer import TransferConfig

    cfg = TransferConfig(multipart_threshold=16 * MiB, multipart_chunksize=16 * MiB, max_concurrency=4)
    c.upload_fileobj(io.BytesIO(data), bucket, "big", Config=cfg)
    assert proxy.count("UploadPart") == 4
    t0 = time.monotonic()
    body = c.get_object(Bucket=bucket, Key="big")["Body"]
    digest, n = hashlib.sha256(), 0
    for chunk in iter(lambda: body.read(MiB), b""):
        digest.update(chunk)
        n += len(chunk)
    elapsed = time.monotonic() - t0
    assert n == len(data) and digest.digest() == hashlib.sha256(data).digest()
    rec = proxy.records("GetObject")[-1]
    assert rec.response_bytes == len(data) and rec.status == 200
    print(f"\n{s3_server.name}: 64 MiB GET through the proxy at {n / elapsed / 1e6:.0f} MB/s")


# ------------------------------------------------------------------ lifecycle
@pytest.mark.s3_servers("moto")
def test_stop_returns_with_stalled_request(s3_server, bucket):
    s3_server.client().put_object(Bucket=bucket, Key="k", Body=b"value")
    proxy = S3Proxy(s3_server.endpoint).start()
    c = _client(s3_server, proxy, retries=NO_RETRY, read_timeout=60)
    c.head_object(Bucket=bucket, Key="k")  # leaves an idle keep-alive connection
    h = proxy.inject(Stall(None), op="GetObject")
    t, res = _run_in_thread(lambda: c.get_object(Bucket=bucket, Key="k")["Body"].read())
    assert h.wait()
    t0 = time.monotonic()
    proxy.stop()
    assert time.monotonic() - t0 < 10
    t.join(10)
    assert isinstance(res.get("error"), botocore.exceptions.BotoCoreError)
    proxy.stop()  # idempotent
    with pytest.raises(botocore.exceptions.EndpointConnectionError):
        c.head_object(Bucket=bucket, Key="k")


# -------------------------------------------------- framing against a local server
class _Upstream(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path.startswith("/b/chunked"):
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for piece in (b"hello ", b"chunked ", b"world"):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
        else:  # body delimited by closing the connection
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"until close")
            self.close_connection = True

    def do_PUT(self):
        te = self.headers.get("Transfer-Encoding", "")
        body = b""
        if "chunked" in te:
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    break
                body += self.rfile.read(size)
                self.rfile.readline()
        else:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        out = f"{self.headers.get('Host')}|{len(body)}|{hashlib.md5(body).hexdigest()}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)


def test_framing_chunked_and_close_delimited():
    import http.client

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with S3Proxy(f"http://127.0.0.1:{server.server_port}") as proxy:
            conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
            conn.request("GET", "/b/chunked")
            r = conn.getresponse()
            assert r.read() == b"hello chunked world"
            body = b"z" * 300_000
            conn.request("PUT", "/b/obj", body=iter([body[:1000], body[1000:]]),
                         headers={"Host": "virtual.example:1234", "Expect": "100-continue"},
                         encode_chunked=True)
            r = conn.getresponse()
            assert r.read() == f"virtual.example:1234|300000|{hashlib.md5(body).hexdigest()}".encode()
            conn.request("GET", "/b/close")
            r = conn.getresponse()
            assert r.read() == b"until close"
            conn.close()
            recs = proxy.records()
            assert [(r.op, r.status) for r in recs] == [
                ("GetObject", 200), ("PutObject", 200), ("GetObject", 200)]
            assert recs[0].response_bytes == len(b"hello chunked world")
            assert recs[1].request_bytes == 300_000
            assert recs[1].request_headers["transfer-encoding"] == "chunked"
    finally:
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------------- pure helpers
def test_classify_and_parse_range():
    h = Headers([("X-Amz-Copy-Source", "/b/k")])
    assert h["x-amz-copy-source"] == "/b/k" and "X-AMZ-COPY-SOURCE" in h
    assert classify("GET", None, None, {}, {}) == "ListBuckets"
    assert classify("PUT", "b", None, {}, {}) == "CreateBucket"
    assert classify("GET", "b", None, {"uploads": ""}, {}) == "ListMultipartUploads"
    assert classify("PUT", "b", "k", {}, h) == "CopyObject"
    assert classify("PUT", "b", "k", {"uploadId": "u", "partNumber": "1"}, h) == "Other"
    assert classify("GET", "b", "k", {"uploadId": "u"}, {}) == "Other"  # ListParts
    assert classify("GET", "b", "k", {"tagging": ""}, {}) == "Other"
    assert classify("DELETE", "b", None, {}, {}) == "Other"
    assert parse_range("bytes=0-0") == (0, 0)
    assert parse_range("bytes=5-") == (5, None)
    assert parse_range("bytes=-10") == (-10, None)
    assert parse_range("bytes=0-1,5-6") is None
    assert parse_range(None) is None
