"""The sequential-read, sequential-write and comparative benchmarks run end to end (on a
tiny object) and report a speed for every variant. Benchmarks never fail on timing: no
threshold is checked here."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

from bench.distant import DistantRelay

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("raw_awscrt", "raw_boto3", "mount", "mount_awscrt", "mount_boto3")


def test_seq_read_benchmark_runs_end_to_end(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "bench.seq_read", "--size-mib", "16", "--runs", "1", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((tmp_path / "seq_read.json").read_text())
    for name in VARIANTS:
        runs = report["variants"][name]["runs"]
        assert len(runs) == 1
        assert runs[0]["bytes"] == 16 * 1024 * 1024
        assert report["variants"][name]["summary"]["median_mb_s"] > 0, name
    for name in ("mount", "mount_awscrt", "mount_boto3"):
        assert report["variants"][name]["runs"][0]["peak_rss_mib"] > 0
        assert report["trace"][name]["verified"] is True  # every byte read back was right
    assert (tmp_path / "seq_read.md").read_text().count("| Pail mount") == 3


def test_seq_read_through_the_distant_relay_reads_every_byte(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "bench.seq_read", "--size-mib", "16", "--runs", "1", "--out", str(tmp_path),
         "--latency-ms", "100", "--connection-mbs", "200"],
        cwd=ROOT, capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((tmp_path / "seq_read.json").read_text())
    assert report["config"]["distant"] == {"latency_ms": 100.0, "connection_mbs": 200.0}
    for name in VARIANTS:
        run = report["variants"][name]["runs"][0]
        assert run["bytes"] == 16 * 1024 * 1024, name
        # Not a speed check: the relay holds every response 100 ms, so no read is quicker.
        assert run["seconds"] >= 0.1, name
    assert report["trace"] is None  # the recording proxy is not put behind the relay
    assert "through a relay: 100 ms" in (tmp_path / "seq_read.md").read_text()


def test_a_negative_relay_setting_is_refused_naming_the_options(tmp_path):
    for module in ("bench.seq_read", "bench.compare"):
        result = subprocess.run(
            [sys.executable, "-m", module, "--latency-ms", "-1", "--out", str(tmp_path)],
            cwd=ROOT, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, check=False)
        assert result.returncode == 2, (module, result.stderr[-2000:])
        assert "--latency-ms and --connection-mbs must not be negative" in result.stderr, module
    assert list(tmp_path.iterdir()) == [], "nothing written"


def test_the_relay_closes_a_client_whose_server_refuses_and_keeps_relaying():
    # Bound but not listening: connecting is refused, as to a server that has died.
    upstream = socket.socket()
    upstream.bind(("127.0.0.1", 0))
    port = upstream.getsockname()[1]
    with upstream, DistantRelay(f"http://127.0.0.1:{port}", latency=0.0, rate=None) as relay:
        relay_address = ("127.0.0.1", int(relay.endpoint.rsplit(":", 1)[1]))
        with socket.create_connection(relay_address, timeout=10) as refused:
            # Nothing sent: a request left unread would turn the close into a reset.
            assert refused.recv(100) == b"", "the relay closes the client's connection"
        upstream.listen()
        upstream.settimeout(10)  # a relay that stopped accepting fails here, not hangs
        with socket.create_connection(relay_address, timeout=10) as client:
            client.sendall(b"ping")
            server, _ = upstream.accept()
            with server:
                server.settimeout(10)
                assert server.recv(100) == b"ping"
                server.sendall(b"pong")
                assert client.recv(100) == b"pong", "later clients are still relayed"


def test_seq_write_benchmark_runs_end_to_end(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "bench.seq_write", "--size-mib", "16", "--runs", "1", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((tmp_path / "seq_write.json").read_text())
    for name in ("raw_boto3", "raw_awscrt", "mount"):
        runs = report["variants"][name]["runs"]
        assert len(runs) == 1
        assert runs[0]["bytes"] == runs[0]["head_size"] == 16 * 1024 * 1024  # HEAD after each write
        assert report["variants"][name]["summary"]["median_mb_s"] > 0, name
    mount = report["variants"]["mount"]["runs"][0]
    assert mount["bytes_verified"] is True and mount["peak_rss_mib"] > 0
    trace = report["trace"]
    assert trace["verified"] is True  # every byte of the object written via the proxy
    assert trace["upload_parts"] == 2 and trace["part_sizes"] == {"8 MiB": 2}
    assert 1 <= trace["max_parts_in_flight"] <= 4
    # Whether the first of two parts reaches the proxy before the writer's close() is a race
    # at this size (it failed once under load); tests/mount/test_write.py checks uploads
    # while writing with a 200 MiB file. Here: the report counts within its parts.
    assert 0 <= trace["parts_done_before_close"] <= trace["parts_sent_before_close"] <= 2
    assert (tmp_path / "seq_write.md").read_text().count("| Pail mount") == 1


def run_compare(tmp_path, *args: str) -> dict:
    """A tiny run of bench.compare (8 MiB objects, one round); its JSON report."""
    result = subprocess.run(
        [sys.executable, "-m", "bench.compare", "--scale", "small", "--size-mib", "8", "--runs", "1", *args,
         "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=150, stdin=subprocess.DEVNULL, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((tmp_path / "compare.json").read_text())


def test_compare_benchmark_runs_end_to_end(tmp_path):
    """Two tiny workloads of the comparative benchmark, Pail and the raw client only (s3fs
    and rclone are not test dependencies; the PNG is written only where matplotlib is),
    plus Pail with --cache, which runs only in reread: the object read twice on one mount,
    the page cache dropped in between; and Pail with --direct-io, in both."""
    report = run_compare(tmp_path, "--only", "seq_read,reread", "--clients", "pail,pail-cache,pail-dio,raw")
    assert list(report["workloads"]) == ["seq_read", "reread"]
    clients = report["workloads"]["seq_read"]["clients"]
    assert set(clients) == {"pail", "pail-dio", "raw"}  # pail-cache only where data is read again
    for name, client in clients.items():
        [run] = client["runs"]
        assert "error" not in run, run
        assert run["bytes"] == 8 * 1024 * 1024, name  # every byte of the object, through each client
        assert client["summaries"]["mb_s"]["median"] == run["mb_s"] > 0, name
        assert run["loopback_mib"] >= 8, name  # the object crossed 127.0.0.1 at least once
    pail = clients["pail"]["runs"][0]
    assert pail["peak_rss_mib"] > 0 and pail["mount_s"] > 0 and pail["page_cache_dropped"] is True
    ratio = report["ratios"]["seq_read"]["pail/raw"]
    assert ratio == clients["pail"]["summaries"]["mb_s"]["median"] / clients["raw"]["summaries"]["mb_s"]["median"]
    assert report["machine"]["load_avg_before"] and report["versions"].keys() == {"s3fs", "rclone"}
    table = (tmp_path / "compare.md").read_text()
    assert "| sequential read, 8 MiB object | MB/s | higher |" in table
    assert f"{ratio:.2f} |" in table
    direct = report["ratios"]["seq_read"]["pail-dio/raw"]
    assert direct == clients["pail-dio"]["summaries"]["mb_s"]["median"] / clients["raw"]["summaries"]["mb_s"]["median"]
    assert "| Pail --direct-io/s3fs | Pail --direct-io/raw |" in table and f"{direct:.2f} |" in table
    assert report["config"]["client_configs"]["pail-dio"]["command"].endswith("--direct-io")
    traffic = clients["pail"]["runs"][0]["loopback_mib"] / clients["raw"]["runs"][0]["loopback_mib"]
    assert f"Traffic on 127.0.0.1 relative to the raw client doing the same reads (median; above 1: bytes " \
           f"fetched that the program did not read): sequential read, 8 MiB object: Pail {traffic:.2f}, " in table

    reread = report["workloads"]["reread"]["clients"]
    assert set(reread) == {"pail", "pail-cache", "pail-dio", "raw"}
    for name, client in reread.items():
        [run] = client["runs"]
        assert "error" not in run, run
        assert run["bytes"] == run["pass2"]["bytes"] == 8 * 1024 * 1024, name  # both epochs, every byte
        assert run["pass2"]["page_cache_dropped"] is True, name
        assert client["summaries"]["pass2_mb_s"]["median"] == run["pass2_mb_s"] > 0, name
    cached = reread["pail-cache"]["runs"][0]
    # Pail's own counters: epoch 1 filled the cache, epoch 2 was served from it, no GET
    assert cached["pail_counters"]["cache_blocks"].get("miss", 0) == 8
    assert cached["pass2"]["pail_counters"]["cache_blocks"] == {"hit": 8}
    assert "GetObject" not in cached["pass2"]["pail_counters"]["s3_requests"]
    assert reread["pail"]["runs"][0]["pass2"]["pail_counters"]["s3_requests"]["GetObject"] >= 1  # no cache
    assert cached["cache_disk_mib"] >= 8 and cached["cache_left_after_unmount_bytes"] == 0
    assert "reread:pass2_mb_s" in report["ratios"] and "pail-cache/pail" in report["ratios"]["reread:pass2_mb_s"]
    assert "| reread 8 MiB object: epoch 2 (page cache dropped) | MB/s | higher |" in table


def test_compare_measures_pail_without_its_own_small_gets_only_when_asked(tmp_path, monkeypatch):
    from bench import compare
    monkeypatch.setattr(compare.peers, "available", lambda client: None)  # s3fs and rclone need not be here
    default = compare.parse([]).client_list
    assert "pail" in default and "pail-crt" not in default
    report = run_compare(tmp_path, "--rand-reads", "16", "--only", "rand_read_1t", "--clients", "pail,pail-crt")
    clients = report["workloads"]["rand_read_1t"]["clients"]
    assert set(clients) == {"pail", "pail-crt"}
    for name, client in clients.items():
        [run] = client["runs"]
        assert "error" not in run and run["bytes"] == 16 * 256 * 1024, (name, run)
        assert run["pail_counters"]["s3_requests"]["GetObject"] >= 1, name
    medians = [clients[c]["summaries"]["mb_s"]["median"] for c in ("pail", "pail-crt")]
    assert report["ratios"]["rand_read_1t"]["pail/pail-crt"] == medians[0] / medians[1]
    table = (tmp_path / "compare.md").read_text()
    assert "| workload | unit | better | Pail | Pail, awscrt only |" in table and "| Pail/Pail, awscrt only |" in table
    ratio = report["ratios"]["rand_read_1t"]["pail/pail-crt"]
    assert f"| {ratio:.2f} |" in table


def test_random_reads_through_one_shared_descriptor_run_end_to_end(tmp_path):
    report = run_compare(tmp_path, "--rand-reads", "16", "--only", "rand_read_shared", "--clients", "pail,raw")
    clients = report["workloads"]["rand_read_shared"]["clients"]
    [run] = clients["pail"]["runs"]
    assert "error" not in run and run["bytes"] == 4 * 16 * 256 * 1024 and run["shared_descriptor"] is True, run
    [raw] = clients["raw"]["runs"]  # awscrt's ranged GETs, every body checked against the object
    assert "error" not in raw and raw["bytes"] == 4 * 16 * 256 * 1024 and raw["reads"] == 64, raw
    table = (tmp_path / "compare.md").read_text()
    assert "4 threads sharing one descriptor" in table
    assert "awscrt ranged GETs from 4 threads, one in flight each, same offsets" in table


def test_compare_through_the_distant_relay_reads_every_byte(tmp_path):
    report = run_compare(tmp_path, "--only", "seq_read", "--clients", "pail,raw", "--latency-ms", "100")
    assert report["config"]["distant"] == {"latency_ms": 100.0, "connection_mbs": 0.0}
    for name, client in report["workloads"]["seq_read"]["clients"].items():
        [run] = client["runs"]
        assert "error" not in run, run
        assert run["bytes"] == 8 * 1024 * 1024, name
        assert run["seconds"] >= 0.1, name  # not a speed check: the relay holds every response 100 ms
    assert "Every client reads and writes through a relay: 100 ms to each response, unlimited MB/s" \
        in (tmp_path / "compare.md").read_text()


def test_the_block_fill_model_reports_each_rule():
    result = subprocess.run(
        [sys.executable, "-m", "bench.blockfill_model", "--blocks", "16", "--block-kib", "256", "--read-kib", "8",
         "--reads-per-block", "0.5,2"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith("| ") and "×" in line]
    assert [row[1].strip() for row in rows] == ["8", "32"]  # R for each R/N
    for row in rows:
        cells = [cell.split() for cell in row[2:]]
        assert len(cells) == 3  # second read only, 1/4, 1/8
        assert all(float(traffic.rstrip("×")) > 0 and float(speed) > 0 for traffic, speed in cells)
