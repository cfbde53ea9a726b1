"""Time to first byte of a file: open(2), then one read(2) of 4 KiB; print JSON.

Run as a child process by bench.compare (``python -m bench.firstbyte PATH``), on a fresh
mount with the page cache dropped: the time covers the lookup of the name, the open, and
the first read returning data (whatever the mount fetches to answer it). The interpreter's
start-up is not in it. The bytes are checked against --verify BLOCK.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

FIRST_READ = 4096


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.firstbyte")
    parser.add_argument("path")
    parser.add_argument("--verify", metavar="BLOCK", required=True)
    args = parser.parse_args(argv)
    with open(args.verify, "rb") as f:
        want = f.read(FIRST_READ)
    t0 = time.perf_counter()
    fd = os.open(args.path, os.O_RDONLY)
    t1 = time.perf_counter()
    try:
        data = os.read(fd, FIRST_READ)
        t2 = time.perf_counter()
    finally:
        os.close(fd)
    if data != want:
        print(f"first {FIRST_READ} bytes are wrong ({len(data)} read)", file=sys.stderr)
        return 1
    json.dump({"bytes": len(data), "seconds": t2 - t0, "open_s": t1 - t0, "first_read_s": t2 - t1,
               "verified": True}, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
