"""Sequential read of one large object: through a Pail mount versus raw S3 clients.

    .venv/bin/python -m bench.seq_read [--size-mib 1024] [--runs 3] [--out bench/results]
                                       [--latency-ms 30 --connection-mbs 100]

Starts a local SeaweedFS (everything on 127.0.0.1), uploads one object of random bytes,
then measures, ``--runs`` times each, interleaved round by round (every other round in
the opposite order: in a fixed order the later variant of a pair won either way round):

  raw_awscrt    awscrt.s3.S3Client GET_OBJECT of the whole object (auto-ranged parallel
                8 MiB parts, SigV4), the body discarded in on_body
  raw_boto3     boto3 ranged GETs of 8 MiB in a pool of 16 threads, bodies read
  mount         a fresh ``pail mount`` (default data path: GETs on Pail's own sockets),
                the file read to the end with 1 MiB reads
  mount_awscrt  the same with PAIL_DATA_PATH=crt in the mount process's environment
                (every GET through awscrt)
  mount_boto3   the same with PAIL_DATA_PATH=boto3

Before every timed run the page cache is dropped and the server's own files are read
back into it, so every run finds the same state: nothing of the client side cached, the
server's data in memory. A last, untimed pass reads the file through each kind of mount
once more via a recording proxy, to check every byte and count the requests.

With ``--latency-ms`` (and ``--connection-mbs``) every client reads through a relay that
makes the server look distant (bench.distant): each response starts that long after its
request and each connection carries at most that many MB/s, as from S3 over a network.
The relay runs in this process: the raw clients' CPU includes its threads'.

Writes OUT/seq_read.json and OUT/seq_read.md and prints the table. Timing never fails
the run; errors (a failed mount, a short read, wrong bytes) do.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
from pathlib import Path

from bench import distant as distant_relay
from bench.clients import BOTO3_THREADS, PART_SIZE, raw_awscrt, raw_boto3, upload
from bench.mounts import READ_SIZE, Mounts, mount_run, trace_pass
from bench.system import MiB, attribute_cpu, machine_info, prepare_run

BLOCK_SIZE = 64 * MiB  # the object is this random block repeated
DATA_PATHS = {"mount": None, "mount_awscrt": "crt", "mount_boto3": "boto3"}  # PAIL_DATA_PATH; None: default

VARIANTS = {
    "raw_awscrt": "raw awscrt (S3Client, 8 MiB parts)",
    "raw_boto3": f"raw boto3 ({BOTO3_THREADS} threads, 8 MiB ranges)",
    "mount": "Pail mount (default: its own sockets)",
    "mount_awscrt": "Pail mount, PAIL_DATA_PATH=crt",
    "mount_boto3": "Pail mount, PAIL_DATA_PATH=boto3",
}


# --------------------------------------------------------------------- report
def summarize(runs: list[dict]) -> dict:
    speeds = [r["mb_s"] for r in runs]
    out = {"median_mb_s": statistics.median(speeds), "min_mb_s": min(speeds), "max_mb_s": max(speeds)}
    for field in ("peak_rss_mib", "mount_cpu_s", "mount_cpu_util", "mount_main_thread_util", "client_cpu_s",
                  "server_cpu_s"):
        values = [r[field] for r in runs if r.get(field) is not None]
        if values:
            out[f"median_{field}"] = statistics.median(values)
    busy = [r["machine"]["busy"] for r in runs if r.get("machine", {}).get("busy") is not None]
    if busy:
        out["median_machine_busy"] = statistics.median(busy)
    return out


def markdown(result: dict) -> str:
    variants = result["variants"]
    lines = [
        (f"Sequential read of a {result['config']['size_mib']} MiB object, SeaweedFS on 127.0.0.1, "
         f"median of {result['config']['runs']} runs (MB/s = 10^6 bytes/s), {result['date']}, "
         f"Pail {result['machine'].get('pail_commit')}"
         f"{' + uncommitted driver/ changes' if result['machine'].get('pail_driver_modified') else ''}"),
        "",
        ("| variant | median MB/s | min–max | ratio to raw awscrt | ratio to raw boto3 | peak RSS | "
         "client CPU s/GiB |"),
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    distant = result["config"].get("distant")
    if distant:
        lines[0] += "; " + distant_relay.describe(distant)
    gib = result["config"]["size_bytes"] / (1024 * MiB)
    for name, label in VARIANTS.items():
        v = variants[name]
        s = v["summary"]
        ratios = result["ratios"].get(name, {})
        rss = f"{s['median_peak_rss_mib']:.0f} MiB" if "median_peak_rss_mib" in s else "–"
        cpu = s.get("median_mount_cpu_s", s.get("median_client_cpu_s"))
        cpu_text = f"{cpu / gib:.1f}" if cpu is not None else "–"
        lines.append(
            f"| {label} | {s['median_mb_s']:.0f} | {s['min_mb_s']:.0f}–{s['max_mb_s']:.0f} | "
            f"{ratios['to_raw_awscrt']:.2f} | {ratios['to_raw_boto3']:.2f} | {rss} | {cpu_text} |")
    lines.append("")
    lines.append("Client CPU: the benchmark process for raw clients, the mount process for mounts "
                 "(the reader and the server are not included). Peak RSS: the mount process's VmHWM.")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.seq_read", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="object size in MiB (default 1024)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per variant (default 3)")
    parser.add_argument("--out", default="bench/results",
                        help="directory for the results (default bench/results)")
    parser.add_argument("--no-trace", action="store_true",
                        help="skip the untimed pass through the recording proxy")
    parser.add_argument("--keep-workdir", action="store_true", help="keep the server's data and mount logs")
    distant_relay.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.size_mib <= 0 or args.runs <= 0:
        parser.error("--size-mib and --runs must be positive")
    distant = distant_relay.settings(parser, args)

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.support
    from tests.support.s3server import start_seaweedfs

    size = args.size_mib * MiB
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="pail-bench-"))
    previous_term = signal.signal(signal.SIGTERM, _raise_interrupt)
    server = relay = None
    mounts = Mounts(workdir)
    try:
        started = datetime.datetime.now(datetime.UTC)
        load_before = os.getloadavg()
        _say(f"starting SeaweedFS in {workdir}")
        server = start_seaweedfs(workdir / "seaweedfs")
        bucket = server.create_bucket("pail-bench")
        block = os.urandom(min(BLOCK_SIZE, size))
        block_file = workdir / "block.bin"
        block_file.write_bytes(block)
        _say(f"uploading {args.size_mib} MiB")
        uploaded = upload(server, bucket, block, size)
        _say(f"uploaded at {uploaded['mb_s']:.0f} MB/s")
        target = server
        if distant:
            relay, target = distant_relay.start(server, distant)
            _say(f"reading {distant_relay.describe(distant)}")

        runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
        for round_no in range(1, args.runs + 1):
            # Interleaved, so drift in machine load hits every variant.
            for name in (list(VARIANTS) if round_no % 2 else list(VARIANTS)[::-1]):
                if name.startswith("raw_"):
                    prepared = prepare_run(server)
                    run = (raw_awscrt if name == "raw_awscrt" else raw_boto3)(target, bucket, size)
                    run.update(prepared)
                else:
                    data_path = DATA_PATHS[name]
                    run = mount_run(mounts, target, bucket, size, data_path)
                    if data_path is not None and run["data_path_seen"] != data_path:
                        _say(f"warning: asked for data path {data_path}, but the mount's threads look "
                             f"like {run['data_path_seen']}")
                attribute_cpu(run)
                run["load_avg_1m"] = round(os.getloadavg()[0], 2)
                runs[name].append(run)
                _say(f"round {round_no}/{args.runs} {name:13s} {run['mb_s']:8.1f} MB/s  "
                     f"({run['seconds']:.2f} s, load {run['load_avg_1m']})")

        trace = None
        if not args.no_trace and not distant:
            _say("untimed pass through the recording proxy (checks every byte, counts requests)")
            trace = trace_pass(mounts, server, bucket, block_file)

        variants = {name: {"label": VARIANTS[name], "runs": runs[name], "summary": summarize(runs[name])}
                    for name in VARIANTS}
        medians = {name: v["summary"]["median_mb_s"] for name, v in variants.items()}
        ratios = {
            name: {"to_raw_awscrt": medians[name] / medians["raw_awscrt"],
                   "to_raw_boto3": medians[name] / medians["raw_boto3"]}
            for name in VARIANTS
        }
        for name in ("mount", "mount_boto3"):
            ratios[name]["to_mount_awscrt"] = medians[name] / medians["mount_awscrt"]
        result = {
            "benchmark": "seq_read",
            "date": started.strftime("%Y-%m-%d %H:%M UTC"),
            "machine": {**machine_info(), "load_avg_before": [round(x, 2) for x in load_before],
                        "load_avg_after": [round(x, 2) for x in os.getloadavg()]},
            "config": {"size_mib": args.size_mib, "size_bytes": size, "runs": args.runs,
                       "part_size": PART_SIZE, "boto3_threads": BOTO3_THREADS, "read_size": READ_SIZE,
                       "random_block": len(block), "mb": "10^6 bytes",
                       "distant": distant},
            "upload": uploaded,
            "variants": variants,
            "ratios": ratios,
            "trace": trace,
        }
        table = markdown(result)
        (out_dir / "seq_read.json").write_text(json.dumps(result, indent=2) + "\n")
        (out_dir / "seq_read.md").write_text(table)
        print(table, end="")
        if trace:
            for name, t in trace.items():
                print(f"{name}: requests {t['requests']}, GET sizes {t['get_sizes']}, "
                      f"max GETs in flight {t['max_gets_in_flight']}, bytes verified: {t['verified']}")
        _say(f"wrote {out_dir / 'seq_read.json'} and {out_dir / 'seq_read.md'}")
        return 0
    except KeyboardInterrupt:
        _say("interrupted; cleaning up")
        return 130
    finally:
        mounts.cleanup()
        if relay is not None:
            relay.stop()
        if server is not None:
            server.stop()
        signal.signal(signal.SIGTERM, previous_term)
        if args.keep_workdir:
            _say(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _say(message: str) -> None:
    print(f"[seq_read] {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
