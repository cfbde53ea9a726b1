"""Pail against s3fs-fuse, rclone mount and a raw S3 client, on one local SeaweedFS.

    .venv/bin/python -m bench.compare [--runs 3] [--only WORKLOAD,...] [--clients pail,pail-cache,s3fs,...]
                                      [--scale full|small] [--size-mib N] [--out bench/results]
                                      [--latency-ms 30 --connection-mbs 100]

(``./bench/run compare`` installs s3fs, rclone and matplotlib first, then runs this.)

Starts SeaweedFS (``weed mini``, every listener on 127.0.0.1, telemetry off), makes the
objects the selected workloads need (bench/dataset.py), then runs each workload ``--runs``
rounds, each round every client once (so drift in the machine's load hits every client
alike), in the opposite order every other round (the place in a round mattered: in two
A/Bs between Pail variants the later one won either way round). Every run of a mount
client is a fresh mount; before the timed part the page cache is dropped and the
server's files read back into it (bench.system.prepare_run; for writes only dropped,
bench.system.settle). Workloads (bench/workloads.py has what each
times, bench/raw.py what the raw client does):

  mount          the mount command to a live mount (and mounted again at once: warm)
  publish        NodePublishVolume of the node server, as kubelet calls it, to a live mount
  ttfb           open() to the first 4 KiB of the large object
  seq_read       the large object read to the end, 1 MiB reads
  parallel_read  4 large objects read at once by 4 processes
  reread         the large object read to the end twice on one mount: epoch 1, then the
                 page cache dropped, then epoch 2 (the raw client: two GETs)
  rand_read_1t   random 256 KiB preads in the large object, 1 thread (and _4t: 4 threads);
                 Pail and pail-cache read the same offsets again after the page cache was
                 dropped (a second pass)
  rand_read_shared  the same as rand_read_4t, the 4 threads reading through one descriptor
                 (as a Parquet reader's thread pool does)
  list           ls -l of a directory of --list-objects objects
  cat_small      one cat of --small-files files of 64 KiB, one after the other
  seq_write      dd bs=1M conv=fsync of a new large file, until the object is in S3

Writes OUT/compare.json (every run, machine, versions, configurations), OUT/compare.md
(the tables, also printed) and OUT/compare.png (needs matplotlib). A failed run is
recorded with its error and the benchmark goes on; the exit status is then 1.

With ``--latency-ms`` (and ``--connection-mbs``) every client, the node server's mounts
included, reaches the server through a relay that makes it look distant (bench.distant);
the test data is uploaded directly, before it starts.

Clients: pail (default options), pail-cache (``--cache DIR --max-cache-size 2GiB``, DIR a
fresh directory on local disk; only in reread and the random reads, where data is read
again), pail-dio (``--direct-io``; in the read workloads), s3fs, rclone, rclone-modtime
(ls -l only) and raw (bench/peers.py, bench/raw.py); pail-crt (small ranged GETs through
awscrt as before driver.s3.direct; in the read workloads) only when named in --clients.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from bench import dataset, peers, raw, report, workloads
from bench import distant as distant_relay
from bench.system import (
    BenchError,
    MiB,
    cpu_seconds,
    loopback_bytes,
    machine_cpu,
    machine_info,
    machine_ticks,
    mount_pid,
    prepare_run,
    settle,
    status_kib,
)
from bench.workloads import WORKLOADS

CLIENTS = ("pail", "pail-cache", "pail-dio", "pail-crt", "s3fs", "rclone", "rclone-modtime", "raw")
# pail-crt measures one change (Pail's own small GETs): only when asked for.
DEFAULT_CLIENTS = tuple(c for c in CLIENTS if c != "pail-crt")
SCALES = {  # size MiB, list objects, small files, random reads per thread
    "full": (1024, 10_000, 1_000, 400),
    "small": (16, 200, 50, 40),
}
PV = "pv-bench"


class Bench:
    def __init__(self, args, server, bucket: str, workdir: Path, data: dataset.Dataset) -> None:
        self.args, self.server, self.bucket, self.workdir, self.data = args, server, bucket, workdir, data
        self.mounts = peers.MountClients(workdir, server, bucket)
        self.node = self.kubelet = None
        self.write_source: Path | None = None

    def head(self, key: str) -> int | None:
        try:
            return self.server.client().head_object(Bucket=self.bucket, Key=key)["ContentLength"]
        except Exception:  # noqa: BLE001 - not there (yet)
            return None

    # ------------------------------------------------------------- one run
    def run(self, workload: str, client: str, round_no: int) -> dict:
        if workload == "mount":
            return self._mount_latency(client)
        if workload == "publish":
            return self._publish_latency()
        writing = workload == "seq_write"
        again = client in WORKLOADS[workload].second_pass
        key = f"write-{client}-{round_no}.bin"
        if client == "raw":
            prepared = settle() if writing else prepare_run(self.server)
            run = self._measured(lambda: self._raw(workload, key), None) | prepared
            if again:
                run |= self._second_pass(lambda: self._raw(workload, key), None, None)
            return run
        mounted = self.mounts.mount(client)
        try:
            prepared = settle() if writing else prepare_run(self.server)
            work = lambda: self._through(workload, mounted.directory, key)  # noqa: E731
            run = self._measured(work, mounted.pid, mounted.metrics_dir)
            if again:
                run |= self._second_pass(work, mounted.pid, mounted.metrics_dir)
            peak = status_kib(mounted.pid, "VmHWM")  # the mount's high-water mark since it started
            cache_bytes = peers.disk_bytes(mounted.cache_dir)
        except BaseException:
            with contextlib.suppress(Exception):  # the run's error is the one to report
                self.mounts.unmount(mounted)
            raise
        unmount_s = self.mounts.unmount(mounted)
        if mounted.cache_dir is not None:  # Pail wipes CACHE/pail-cache at unmount
            run["cache_disk_mib"] = round(cache_bytes / MiB, 1)
            run["cache_left_after_unmount_bytes"] = peers.disk_bytes(mounted.cache_dir)
            shutil.rmtree(mounted.cache_dir, ignore_errors=True)
        if writing:  # untimed: every byte of what the mount wrote
            from bench.writes import verify_bytes
            checked = verify_bytes(self.server, self.bucket, key, self.data.block, self.data.size)
            if not checked["verified"]:
                raise BenchError(f"wrong bytes in {key} written through {client}: {checked}")
            run["bytes_verified"] = True
        return run | prepared | {"mount_s": round(mounted.seconds, 3), "unmount_s": round(unmount_s, 2),
                                 "peak_rss_mib": round(peak / 1024, 1) if peak else None}

    def _measured(self, work, pid: int | None, metrics_dir: Path | None = None) -> dict:
        counted0 = peers.pail_counters(metrics_dir)
        cpu0, server0, ticks0 = cpu_seconds(pid) if pid else None, cpu_seconds(self.server.process.pid), machine_ticks()
        sent0 = loopback_bytes()
        run = work()
        sent1 = loopback_bytes()
        cpu1, server1, ticks1 = cpu_seconds(pid) if pid else None, cpu_seconds(self.server.process.pid), machine_ticks()
        if pid:
            run["mount_cpu_s"] = round((cpu1 or 0) - (cpu0 or 0), 2)
        run["server_cpu_s"] = round((server1 or 0) - (server0 or 0), 2)
        run["machine"] = machine_cpu(ticks0, ticks1)
        if sent0 is not None and sent1 is not None:
            # What a client fetched beyond what it was asked for shows here (s3fs reads
            # ahead around random reads); SeaweedFS's own hops are on loopback too.
            run["loopback_mib"] = round((sent1 - sent0) / MiB, 1)
        if (counted := peers.counters_delta(counted0, peers.pail_counters(metrics_dir))) is not None:
            run["pail_counters"] = counted  # what the mount did during the timed part
        return run

    def _second_pass(self, work, pid: int | None, metrics_dir: Path | None) -> dict:
        """The same work again on the same mount (or raw client), after the page cache was
        dropped and the server's files read back into it: epoch 2. Its whole run goes
        under "pass2", its metric (and IOPS) also as pass2_FIELD at the top."""
        prepared = prepare_run(self.server)
        second = self._measured(work, pid, metrics_dir) | prepared
        return {"pass2": second, **{f"pass2_{f}": second[f] for f in ("mb_s", "iops", "seconds") if f in second}}

    def _through(self, workload: str, directory: str, key: str) -> dict:
        a, d = self.args, self.data
        return {
            "ttfb": lambda: workloads.ttfb(directory, d),
            "seq_read": lambda: workloads.seq_read(directory, d),
            "parallel_read": lambda: workloads.parallel_read(directory, d),
            "reread": lambda: workloads.seq_read(directory, d),  # read twice: Bench.run does the second pass
            "rand_read_1t": lambda: workloads.rand_read(directory, d, 1, a.rand_reads),
            "rand_read_4t": lambda: workloads.rand_read(directory, d, 4, a.rand_reads),
            "rand_read_shared": lambda: workloads.rand_read(directory, d, 4, a.rand_reads, shared=True),
            "list": lambda: workloads.list_dir(directory, d),
            "cat_small": lambda: workloads.cat_small(directory, d),
            "seq_write": lambda: workloads.seq_write(directory, d, key, self.write_source, self.head),
        }[workload]()

    def _raw(self, workload: str, key: str) -> dict:
        a, d, s = self.args, self.data, self.server
        return {
            "ttfb": lambda: raw.ttfb(s, d),
            "seq_read": lambda: raw.seq_read(s, d),
            "parallel_read": lambda: raw.parallel_read(s, d),
            "reread": lambda: raw.seq_read(s, d),  # read twice: Bench.run does the second pass
            "rand_read_1t": lambda: raw.rand_read(s, d, 1, a.rand_reads),
            "rand_read_4t": lambda: raw.rand_read(s, d, 4, a.rand_reads),
            "rand_read_shared": lambda: raw.rand_read(s, d, 4, a.rand_reads),  # no descriptor: as _4t
            "list": lambda: raw.list_walk(s, d),
            "cat_small": lambda: raw.cat_small(s, d),
            "seq_write": lambda: raw.seq_write(s, d, key, self.head),
        }[workload]()

    # -------------------------------------------------------- mount latency
    def _mount_latency(self, client: str) -> dict:
        """Cold: right after the page cache was dropped (the client's own binaries and
        libraries too). Warm: unmounted and mounted again at once."""
        prepared = prepare_run(self.server)
        mounted = self.mounts.mount(client)
        peak = status_kib(mounted.pid, "VmHWM")
        self.mounts.unmount(mounted)
        again = self.mounts.mount(client)
        self.mounts.unmount(again)
        return {"seconds": mounted.seconds, "warm_seconds": again.seconds,
                "peak_rss_mib": round(peak / 1024, 1) if peak else None, **prepared}

    def _publish_latency(self) -> dict:
        """NodePublishVolume over the node server's socket, as kubelet calls it, until it
        returns, plus a stat of the target; then NodeUnpublishVolume. Cold and warm as above."""
        if self.node is None:
            from tests.support.kubelet import Kubelet, NodeServer
            self.node = NodeServer(root=self.workdir / "node", env=self.server.env()).start()
            self.kubelet = Kubelet(self.node)
        attributes = {"bucketName": self.bucket, "endpoint": self.server.endpoint, "region": "us-east-1",
                      "forcePathStyle": "true"}
        prepared = prepare_run(self.server)
        out = {}
        for name in ("seconds", "warm_seconds"):
            pod = self.kubelet.new_pod()
            t0 = time.perf_counter()
            target = self.kubelet.publish(pod, PV, attributes)
            os.stat(target)
            out[name] = time.perf_counter() - t0
            pid = mount_pid(str(target))
            if name == "seconds":
                peak = status_kib(pid, "VmHWM") if pid else None
                out["peak_rss_mib"] = round(peak / 1024, 1) if peak else None
            self.kubelet.unpublish(pod, PV)
            deadline = time.monotonic() + 30
            while pid is not None and mount_pid(str(target)) == pid:
                if time.monotonic() > deadline:
                    raise BenchError(f"the mount process of {target} still runs 30 s after unpublish")
                time.sleep(0.05)
        return out | prepared

    def cleanup(self) -> None:
        self.mounts.cleanup()
        self.mounts.forget_secrets()
        if self.kubelet is not None:
            with contextlib.suppress(Exception):
                self.kubelet.unpublish_all()
        if self.node is not None:
            with contextlib.suppress(Exception):
                self.node.stop()


# ----------------------------------------------------------------------- main
def parse(argv: list[str] | None):
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="rounds; every client once per round (default 3)")
    parser.add_argument("--only", help=f"comma-separated workloads (default all: {','.join(WORKLOADS)})")
    parser.add_argument("--clients", help=f"comma-separated clients: {','.join(CLIENTS)} "
                                           f"(default all but pail-crt)")
    parser.add_argument("--scale", choices=SCALES, default="full",
                        help="full: 1 GiB objects, 10,000 to list, 1,000 small files; small: a quick run")
    parser.add_argument("--size-mib", type=int, help="size of each large object")
    parser.add_argument("--list-objects", type=int, help="objects in the directory ls -l lists")
    parser.add_argument("--small-files", type=int, help="64 KiB files cat reads")
    parser.add_argument("--rand-reads", type=int, help="random reads per thread")
    parser.add_argument("--out", default="bench/results", help="directory for the results")
    parser.add_argument("--keep-workdir", action="store_true", help="keep the server's data and the mount logs")
    distant_relay.add_arguments(parser)
    args = parser.parse_args(argv)
    args.distant = distant_relay.settings(parser, args)
    size, lists, smalls, reads = SCALES[args.scale]
    args.size_mib = args.size_mib or size
    args.list_objects = args.list_objects or lists
    args.small_files = args.small_files or smalls
    args.rand_reads = args.rand_reads or reads
    args.workloads = _pick(parser, args.only, list(WORKLOADS), "workload")
    args.client_list = _pick(parser, args.clients, list(CLIENTS), "client") if args.clients else list(DEFAULT_CLIENTS)
    if min(args.runs, args.size_mib, args.list_objects, args.small_files, args.rand_reads) <= 0:
        parser.error("counts and sizes must be positive")
    for client in args.client_list:
        if (why := peers.available(client)) is not None:
            parser.error(f"{why}; or leave it out with --clients")
    return args


def _pick(parser, given: str | None, known: list[str], what: str) -> list[str]:
    if not given:
        return known
    wanted = [x.strip() for x in given.split(",") if x.strip()]
    unknown = [x for x in wanted if x not in known]
    if unknown:
        parser.error(f"unknown {what}(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return [x for x in known if x in wanted]  # in the benchmark's order


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.support
    from tests.support.s3server import start_seaweedfs

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="pail-compare-"))
    shm = Path(tempfile.mkdtemp(prefix="pail-compare-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    previous_term = signal.signal(signal.SIGTERM, _raise_interrupt)
    server = bench = relay = None
    failed = False
    try:
        started, t_start = datetime.datetime.now(datetime.UTC), time.perf_counter()
        load_before = os.getloadavg()
        _say(f"starting SeaweedFS in {workdir}")
        server = start_seaweedfs(workdir / "seaweedfs")
        bucket = server.create_bucket("pail-bench")
        data = dataset.make(server, bucket, workdir, args.size_mib * MiB, args.list_objects, args.small_files,
                            set(args.workloads), _say)
        target = server
        if args.distant:
            relay, target = distant_relay.start(server, args.distant)
            _say(f"every client {distant_relay.describe(args.distant)}")
        bench = Bench(args, target, bucket, workdir, data)
        if "seq_write" in args.workloads:
            bench.write_source = workloads.write_source(data, shm)
        results: dict[str, dict] = {}
        for workload in args.workloads:
            clients = [c for c in WORKLOADS[workload].clients if c in args.client_list]
            if not clients:
                continue
            results[workload] = {"clients": {c: {"runs": []} for c in clients}}
            for round_no in range(1, args.runs + 1):
                # Interleaved, so drift in machine load hits every client; every other round
                # backwards, so no client always runs first.
                for client in (clients if round_no % 2 else clients[::-1]):
                    try:
                        run = bench.run(workload, client, round_no)
                    except Exception as exc:  # noqa: BLE001 - recorded; the other runs go on
                        failed = True
                        run = {"error": f"{type(exc).__name__}: {exc}"[:3000]}
                        _say(f"{workload} {client} round {round_no}: FAILED {run['error'][:500]}")
                        bench.mounts.cleanup()  # whatever that run left mounted
                    run["load_avg_1m"] = round(os.getloadavg()[0], 2)
                    results[workload]["clients"][client]["runs"].append(run)
                    if "error" not in run:
                        metric = WORKLOADS[workload].metric
                        second = (f", second pass {run['pass2_' + metric]:.2f}" if "pass2_" + metric in run else "")
                        _say(f"{workload:14s} {client:15s} round {round_no}/{args.runs}: "
                             f"{run[metric]:9.2f} {WORKLOADS[workload].unit}{second}  (load {run['load_avg_1m']})")
        for workload, w in results.items():
            fields = {r.field for r in report.rows([workload])}
            for c in w["clients"].values():
                c["summaries"] = {f: s for f in fields if (s := report.summarize(c["runs"], f)) is not None}
        result = {
            "benchmark": "compare",
            "date": started.strftime("%Y-%m-%d %H:%M UTC"),
            "wall_seconds": round(time.perf_counter() - t_start, 1),
            "machine": {**machine_info(), "load_avg_before": [round(x, 2) for x in load_before],
                        "load_avg_after": [round(x, 2) for x in os.getloadavg()]},
            "versions": peers.versions(),
            "config": {"runs": args.runs, "scale": args.scale, "size_mib": args.size_mib,
                       "list_objects": args.list_objects, "small_files": args.small_files,
                       "rand_reads_per_thread": args.rand_reads, "workloads": args.workloads,
                       "clients": args.client_list, "dataset": data.describe(),
                       "client_configs": bench.mounts.configs(), "distant": args.distant,
                       "workload_definitions": {n: WORKLOADS[n].__dict__ for n in results},
                       "mb": "10^6 bytes"},
            "workloads": results,
        }
        result["ratios"] = {report.row_id(row): report.ratios(result, row) for row in report.rows(list(results))}
        table = report.markdown(result)
        (out_dir / "compare.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        (out_dir / "compare.md").write_text(table)
        png = report.chart(result, out_dir / "compare.png")
        print(table, end="")
        _say(f"wrote {out_dir / 'compare.json'}, {out_dir / 'compare.md'}"
             + (f" and {out_dir / 'compare.png'}" if png else " (no PNG: matplotlib is not installed)")
             + f" in {result['wall_seconds'] / 60:.1f} min")
        return 1 if failed else 0
    except KeyboardInterrupt:
        _say("interrupted; cleaning up")
        return 130
    finally:
        if bench is not None:
            bench.cleanup()
        if relay is not None:
            relay.stop()
        if server is not None:
            server.stop()
        signal.signal(signal.SIGTERM, previous_term)
        shutil.rmtree(shm, ignore_errors=True)
        if args.keep_workdir:
            _say(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _say(message: str) -> None:
    print(f"[compare] {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
