"""Sequential write of one large new object: through a Pail mount versus raw S3 clients.

    .venv/bin/python -m bench.seq_write [--size-mib 1024] [--runs 3] [--out bench/results]

Starts a local SeaweedFS (everything on 127.0.0.1) and makes a random 64 MiB block; every
object written is that block repeated. Then measures, ``--runs`` times each, interleaved
round by round, each run writing a new key:

  raw_boto3   boto3 multipart upload as Pail sends it: CreateMultipartUpload, UploadPart
              of 8 MiB from a pool of 4 threads (4 parts in flight at most), each part
              with its CRC32C, CompleteMultipartUpload
  raw_awscrt  awscrt.s3.S3Client PUT_OBJECT of the whole object from a stream (8 MiB
              parts, CRC32C in a trailer), as a second reference
  mount       a fresh ``pail mount`` (default options), a new file written by a separate
              process with 1 MiB write(2) calls, then close(), which returns once the
              object is complete: timed from open to the end of close

Before every timed run the page cache is written back and dropped, so no run pays for the
writeback of the one before. After every run a HEAD checks the object's size (for the
mount, before unmounting). Untimed, the objects written through mounts are read back and
every byte checked, and one more write through a mount goes via a recording proxy to
count its requests (UploadParts, their sizes, how many in flight, how many before close).

Writes OUT/seq_write.json and OUT/seq_write.md and prints the table. Timing never fails
the run; errors (a failed mount, a failed write or close, a wrong size, wrong bytes) do.
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

from bench.clients import PART_SIZE
from bench.mounts import Mounts
from bench.system import BenchError, MiB, attribute_cpu, machine_info, settle
from bench.writes import (
    PARTS_IN_FLIGHT,
    WRITE_SIZE,
    head_size,
    mount_write,
    raw_awscrt,
    raw_boto3,
    trace_write_pass,
    verify_bytes,
)

BLOCK_SIZE = 64 * MiB  # every object is this random block repeated
GiB = 1024 * MiB

VARIANTS = {
    "raw_boto3": f"raw boto3 multipart (8 MiB parts, {PARTS_IN_FLIGHT} in flight)",
    "raw_awscrt": "raw awscrt PUT_OBJECT (S3Client, 8 MiB parts)",
    "mount": "Pail mount, 1 MiB writes + close()",
}


# --------------------------------------------------------------------- report
def summarize(runs: list[dict]) -> dict:
    speeds = [r["mb_s"] for r in runs]
    out = {"median_mb_s": statistics.median(speeds), "min_mb_s": min(speeds), "max_mb_s": max(speeds)}
    for field in ("client_cpu_s", "mount_cpu_s", "mount_cpu_util", "mount_main_thread_util", "peak_rss_mib",
                  "peak_rss_growth_mib", "close_s", "writer_cpu_s", "server_cpu_s"):
        values = [r[field] for r in runs if r.get(field) is not None]
        if values:
            out[f"median_{field}"] = statistics.median(values)
    busy = [r["machine"]["busy"] for r in runs if r.get("machine", {}).get("busy") is not None]
    if busy:
        out["median_machine_busy"] = statistics.median(busy)
    return out


def markdown(result: dict) -> str:
    config, machine = result["config"], result["machine"]
    lines = [
        (f"Sequential write of a new {config['size_mib']} MiB object, SeaweedFS on 127.0.0.1, "
         f"median of {config['runs']} runs (MB/s = 10^6 bytes/s), {result['date']}, "
         f"Pail {machine.get('pail_commit')}"
         f"{' + uncommitted driver/ changes' if machine.get('pail_driver_modified') else ''}"),
        "",
        ("| variant | median MB/s | min–max | ratio to raw boto3 | ratio to raw awscrt | "
         "client CPU s/GiB | peak RSS growth | close() |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    gib = config["size_bytes"] / GiB
    for name, label in VARIANTS.items():
        s = result["variants"][name]["summary"]
        ratios = result["ratios"][name]
        cpu = s.get("median_mount_cpu_s", s.get("median_client_cpu_s"))
        growth = s.get("median_peak_rss_growth_mib")
        close = s.get("median_close_s")
        lines.append(
            f"| {label} | {s['median_mb_s']:.0f} | {s['min_mb_s']:.0f}–{s['max_mb_s']:.0f} | "
            f"{ratios['to_raw_boto3']:.2f} | {ratios['to_raw_awscrt']:.2f} | "
            f"{f'{cpu / gib:.1f}' if cpu is not None else '–'} | "
            f"{f'{growth:.0f} MiB' if growth is not None else '–'} | "
            f"{f'{close:.2f} s' if close is not None else '–'} |")
    lines += ["", ("Client CPU: the benchmark process for raw clients, the mount process for the mount "
                   "(the writer and the server are not included). Peak RSS growth: the mount process's "
                   "peak RSS during the write above its RSS before it. close(): time spent in close(2).")]
    t = result.get("trace")
    if t:
        sizes = ", ".join(f"{n} × {size}" for size, n in t["part_sizes"].items())
        requests = ", ".join(f"{op} {n}" for op, n in sorted(t["requests"].items()))
        lines += ["", (f"Untimed pass through the recording proxy: {t['upload_parts']} UploadPart ({sizes}), "
                       f"at most {t['max_parts_in_flight']} in flight, {t['parts_sent_before_close']} "
                       f"sent before close() (the first {t['first_part_after_open_s']:.2f} s after open, "
                       f"close() {t['close_called_after_open_s']:.2f} s after open); requests "
                       f"{requests}; every byte checked.")]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.seq_write",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="object size in MiB (default 1024)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per variant (default 3)")
    parser.add_argument("--out", default="bench/results",
                        help="directory for the results (default bench/results)")
    parser.add_argument("--no-trace", action="store_true",
                        help="skip the untimed pass through the recording proxy")
    parser.add_argument("--keep-workdir", action="store_true", help="keep the server's data and mount logs")
    args = parser.parse_args(argv)
    if args.size_mib <= 0 or args.runs <= 0:
        parser.error("--size-mib and --runs must be positive")

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.support
    from tests.support.s3server import start_seaweedfs

    size = args.size_mib * MiB
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="pail-bench-"))
    previous_term = signal.signal(signal.SIGTERM, _raise_interrupt)
    server = None
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

        runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
        for round_no in range(1, args.runs + 1):
            for name in VARIANTS:  # interleaved, so drift in machine load hits every variant
                key = f"seq-write-{name}-{round_no}.bin"
                if name == "mount":
                    run = mount_write(mounts, server, bucket, key, size, block_file)
                else:
                    prepared = settle()
                    run = (raw_boto3 if name == "raw_boto3" else raw_awscrt)(server, bucket, key, block, size)
                    run.update(prepared, head_size=head_size(server, bucket, key))
                    if run["head_size"] != size:
                        raise BenchError(f"{name}: HEAD says {run['head_size']} bytes, expected {size}")
                run["key"] = key
                attribute_cpu(run)
                run["load_avg_1m"] = round(os.getloadavg()[0], 2)
                runs[name].append(run)
                _say(f"round {round_no}/{args.runs} {name:10s} {run['mb_s']:8.1f} MB/s  "
                     f"({run['seconds']:.2f} s, load {run['load_avg_1m']})")

        _say("untimed: reading back every object written through a mount, checking every byte")
        for run in runs["mount"]:
            checked = verify_bytes(server, bucket, run["key"], block, size)
            if not checked["verified"]:
                raise BenchError(f"wrong bytes in {run['key']}: {checked}")
            run["bytes_verified"] = True
        trace = None
        if not args.no_trace:
            _say("untimed pass through the recording proxy (counts requests, checks every byte)")
            trace = trace_write_pass(mounts, server, bucket, "seq-write-trace.bin", size, block, block_file)

        variants = {name: {"label": VARIANTS[name], "runs": runs[name], "summary": summarize(runs[name])}
                    for name in VARIANTS}
        medians = {name: v["summary"]["median_mb_s"] for name, v in variants.items()}
        ratios = {name: {"to_raw_boto3": medians[name] / medians["raw_boto3"],
                         "to_raw_awscrt": medians[name] / medians["raw_awscrt"]} for name in VARIANTS}
        result = {
            "benchmark": "seq_write",
            "date": started.strftime("%Y-%m-%d %H:%M UTC"),
            "machine": {**machine_info(), "load_avg_before": [round(x, 2) for x in load_before],
                        "load_avg_after": [round(x, 2) for x in os.getloadavg()]},
            "config": {"size_mib": args.size_mib, "size_bytes": size, "runs": args.runs,
                       "part_size": PART_SIZE, "parts_in_flight": PARTS_IN_FLIGHT, "write_size": WRITE_SIZE,
                       "random_block": len(block), "checksums": "CRC32C", "mb": "10^6 bytes"},
            "variants": variants,
            "ratios": ratios,
            "trace": trace,
        }
        table = markdown(result)
        (out_dir / "seq_write.json").write_text(json.dumps(result, indent=2) + "\n")
        (out_dir / "seq_write.md").write_text(table)
        print(table, end="")
        _say(f"wrote {out_dir / 'seq_write.json'} and {out_dir / 'seq_write.md'}")
        return 0
    except KeyboardInterrupt:
        _say("interrupted; cleaning up")
        return 130
    finally:
        mounts.cleanup()
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
    print(f"[seq_write] {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
