"""bench.compare's results as numbers, a Markdown table and a PNG chart.

summarize() turns each client's runs of a workload into a median and a min–max;
ratios() divides Pail's median by each peer's and by the raw client's, and Pail with
--cache's (pail-cache) by Pail's and the raw client's, and Pail with --direct-io's
(pail-dio) by s3fs's and the raw client's, per row of the table; markdown()
and chart() present them. A ratio is Pail / peer: above 1 Pail is ahead where higher is
better (MB/s), behind where lower is better (seconds). A workload with a second pass
(reread's epoch 2, the random reads' second pass) has a second row, of the runs'
"pass2_" fields.
"""

from __future__ import annotations

import re
import statistics
import textwrap
from dataclasses import dataclass

from bench.distant import describe as describe_distant
from bench.workloads import WORKLOADS

CLIENT_LABELS = {"pail": "Pail", "pail-cache": "Pail --cache", "pail-dio": "Pail --direct-io",
                 "pail-crt": "Pail, awscrt only", "s3fs": "s3fs",
                 "rclone": "rclone", "rclone-modtime": "rclone --use-server-modtime", "raw": "raw client"}
PEERS = ("s3fs", "rclone", "raw")
MOUNT_CLIENTS = ("pail", "pail-cache", "pail-dio", "pail-crt", "s3fs", "rclone", "rclone-modtime")


@dataclass(frozen=True)
class Row:
    workload: str
    field: str  # the run field compared
    label: str
    unit: str
    better: str


def rows(workloads: list[str]) -> list[Row]:
    out = []
    for name in workloads:
        w = WORKLOADS[name]
        out.append(Row(name, w.metric, w.label, w.unit, w.better))
        if name in ("mount", "publish"):  # the same runs, mounted again right away
            out.append(Row(name, "warm_seconds", w.label.replace("cold", "warm"), "s", "lower"))
        if w.second_pass:  # the same runs, the work done again on the same mount
            out.append(Row(name, "pass2_" + w.metric, w.second_label, w.unit, w.better))
    return out


def summarize(runs: list[dict], field: str) -> dict | None:
    values = [r[field] for r in runs if "error" not in r and r.get(field) is not None]
    if not values:
        return None
    out = {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}
    rss = [r["peak_rss_mib"] for r in runs if r.get("peak_rss_mib") is not None]
    if rss:
        out["median_peak_rss_mib"] = statistics.median(rss)
        out["max_peak_rss_mib"] = max(rss)
    return out


def row_id(row: Row) -> str:
    return row.workload if row.field == WORKLOADS[row.workload].metric else f"{row.workload}:{row.field}"


def ratios(result: dict, row: Row) -> dict:
    clients = result["workloads"].get(row.workload, {}).get("clients", {})

    def median(client: str) -> float | None:
        s = clients.get(client, {}).get("summaries", {}).get(row.field)
        return s["median"] if s else None

    pail, cached, direct = median("pail"), median("pail-cache"), median("pail-dio")
    out = {}
    for peer in ("pail-crt", "s3fs", "rclone", "rclone-modtime", "raw"):
        other = median(peer)
        if pail is not None and other:
            out[f"pail/{peer}"] = pail / other
    for variant, value, others in (("pail-cache", cached, ("pail", "raw")), ("pail-dio", direct, ("s3fs", "raw"))):
        for other_name in others:
            other = median(other_name)
            if value is not None and other:
                out[f"{variant}/{other_name}"] = value / other
    return out


def _fmt(v: float | None) -> str:
    if v is None:
        return "–"
    if abs(v) >= 100:
        return f"{v:.0f}"
    return f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"


def _labels(row: Row, config: dict) -> str:
    return row.label.format(size=f"{config['size_mib']} MiB", list=f"{config['list_objects']:,}",
                            small=f"{config['small_files']:,}")


def markdown(result: dict) -> str:
    config, machine = result["config"], result["machine"]
    present = [c for c in CLIENT_LABELS if any(c in w["clients"] for w in result["workloads"].values())]
    has_modtime = "rclone-modtime" in present
    has_cache = "pail-cache" in present
    has_crt = "pail-crt" in present
    has_dio = "pail-dio" in present
    lines = [
        (f"Pail against s3fs-fuse, rclone mount and a raw S3 client on one local SeaweedFS (127.0.0.1), "
         f"{result['date']}: median of {config['runs']} runs (min–max), each on a fresh mount with the page "
         f"cache dropped. Pail {machine.get('pail_commit')}"
         f"{' + uncommitted driver/ changes' if machine.get('pail_driver_modified') else ''}, "
         f"{_short(result['versions'].get('s3fs')) or 's3fs not run'}, "
         f"{result['versions'].get('rclone') or 'rclone not run'}. "
         f"Load average {machine['load_avg_before'][0]:.2f} before, {machine['load_avg_after'][0]:.2f} after; "
         f"MB/s = 10^6 bytes/s."),
        *(["", f"Every client reads and writes {describe_distant(config['distant'])}."]
          if config.get("distant") else []),
        "",
        "| workload | unit | better | " + " | ".join(CLIENT_LABELS[c] for c in present)
        + " | Pail/s3fs | Pail/rclone | Pail/raw |" + (" Pail/Pail, awscrt only |" if has_crt else "")
        + (" Pail --cache/Pail | Pail --cache/raw |" if has_cache else "")
        + (" Pail --direct-io/s3fs | Pail --direct-io/raw |" if has_dio else ""),
        "|---|---|---|" + "---:|" * len(present) + "---:|---:|---:|" + ("---:|" if has_crt else "")
        + ("---:|---:|" if has_cache else "") + ("---:|---:|" if has_dio else ""),
    ]
    for row in rows(list(result["workloads"])):
        clients = result["workloads"][row.workload]["clients"]
        cells = []
        for client in present:
            runs = clients.get(client, {}).get("runs")
            s = clients.get(client, {}).get("summaries", {}).get(row.field)
            if s is None:
                cells.append("error" if any("error" in r for r in runs or []) else "–")
            elif s["n"] == 1:
                cells.append(_fmt(s["median"]))
            else:
                cells.append(f"{_fmt(s['median'])} ({_fmt(s['min'])}–{_fmt(s['max'])})")
        r = result["ratios"].get(row_id(row), {})
        rclone = r.get("pail/rclone-modtime") if row.workload == "list" and has_modtime else r.get("pail/rclone")
        mark = "¹" if row.workload == "list" and has_modtime and rclone is not None else ""
        ratio_cells = [_fmt(r.get("pail/s3fs")), _fmt(rclone) + mark, _fmt(r.get("pail/raw"))]
        if has_crt:
            ratio_cells.append(_fmt(r.get("pail/pail-crt")))
        if has_cache:
            ratio_cells += [_fmt(r.get("pail-cache/pail")), _fmt(r.get("pail-cache/raw"))]
        if has_dio:
            ratio_cells += [_fmt(r.get("pail-dio/s3fs")), _fmt(r.get("pail-dio/raw"))]
        lines.append(f"| {_labels(row, config)} | {row.unit} | {row.better} | " + " | ".join(cells) + " | "
                     + " | ".join(ratio_cells) + " |")
    lines += ["", ("Ratios are Pail's median divided by the other client's median from the same run: above 1 "
                   "Pail is ahead where higher is better, behind where lower is better.")]
    if has_cache:
        lines.append(f"Pail --cache is `pail mount --cache DIR --max-cache-size 2GiB`, DIR a fresh directory on "
                     f"local disk for every mount; it runs only where data is read again (reread, random reads). "
                     f"Second pass / epoch 2: the same reads again on the same mount after the page cache was "
                     f"dropped (and the server's files read back into it)." + _cache_counts(result))
    if has_dio:
        lines.append("Pail --direct-io is `pail mount --direct-io`: files opened for reading bypass the kernel's "
                     "page cache; it runs in the read workloads.")
    if has_modtime:
        lines.append("¹ For ls -l, Pail/rclone is against rclone with --use-server-modtime, the setting rclone "
                     "documents for fast listings (without it rclone reads every object's modification time "
                     "with a HEAD).")
    iops = []
    for name in ("rand_read_1t", "rand_read_4t", "rand_read_shared"):
        clients = result["workloads"].get(name, {}).get("clients", {})
        for field, what in (("iops", name), ("pass2_iops", f"{name} second pass")):
            found = {c: _median_of(v["runs"], field) for c, v in clients.items()}
            if any(v is not None for v in found.values()):
                iops.append(f"{what}: " + ", ".join(f"{CLIENT_LABELS[c]} {v:.0f}" for c, v in found.items()
                                                     if v is not None))
    if iops:
        lines.append("Random reads in IOPS (median): " + "; ".join(iops) + ".")
    if traffic := _traffic(result, config):
        lines.append(traffic)
    raws = [f"{_labels(rows([n])[0], config).partition(': ')[0]}: {WORKLOADS[n].raw}" for n in result["workloads"]
            if WORKLOADS[n].raw and "raw" in result["workloads"][n]["clients"]]
    if raws:
        lines.append("The raw client: " + "; ".join(raws) + ".")
    lines += _rss_table(result, present)
    errors = [f"- {w} / {c} run {i + 1}: {r['error']}" for w, v in result["workloads"].items()
              for c, cv in v["clients"].items() for i, r in enumerate(cv["runs"]) if "error" in r]
    if errors:
        lines += ["", "Errors:", *errors]
    return "\n".join(lines) + "\n"


def _cache_counts(result: dict) -> str:
    """What Pail's own counters say the cache did in each pass (median of the runs): blocks
    of 1 MiB read from the cache (hit) and fetched from S3 (miss), and GetObject requests."""
    parts = []
    for name, w in result["workloads"].items():
        runs = [r for r in w["clients"].get("pail-cache", {}).get("runs", []) if "error" not in r]
        for label, get in (("pass 1", lambda r: r.get("pail_counters")),
                           ("pass 2", lambda r: (r.get("pass2") or {}).get("pail_counters"))):
            counted = [c for c in map(get, runs) if c]
            if not counted:
                continue
            hit = statistics.median(c["cache_blocks"].get("hit", 0) for c in counted)
            miss = statistics.median(c["cache_blocks"].get("miss", 0) for c in counted)
            gets = statistics.median(c["s3_requests"].get("GetObject", 0) for c in counted)
            parts.append(f"{name} {label}: {hit:.0f} hit, {miss:.0f} missed, {gets:.0f} GETs")
    return (" Cache blocks of Pail --cache (its own counters, median): " + "; ".join(parts) + ".") if parts else ""


def _traffic(result: dict, config: dict) -> str:
    """Bytes each client moved on 127.0.0.1 per byte the raw client moved for the same reads
    (median): above 1, it fetched bytes the program did not ask for (or asked more often).
    SeaweedFS's hops between its own servers count too, alike for every client."""
    parts = []
    for name in ("seq_read", "parallel_read", "rand_read_1t", "rand_read_4t", "rand_read_shared"):
        clients = result["workloads"].get(name, {}).get("clients", {})
        raw = _median_of(clients.get("raw", {}).get("runs", []), "loopback_mib")
        if not raw:
            continue
        found = {c: _median_of(v["runs"], "loopback_mib") for c, v in clients.items() if c != "raw"}
        found = {c: v / raw for c, v in found.items() if v is not None}
        if found:
            label = _labels(rows([name])[0], config).partition(": ")[0]
            parts.append(f"{label}: " + ", ".join(f"{CLIENT_LABELS[c]} {v:.2f}" for c, v in found.items()))
    return ("Traffic on 127.0.0.1 relative to the raw client doing the same reads (median; above 1: bytes "
            "fetched that the program did not read): " + "; ".join(parts) + ".") if parts else ""


def _short(s3fs: str | None) -> str | None:
    """s3fs's --version line is long: "Amazon Simple Storage Service File System V1.90 (...)"."""
    found = re.search(r"\bV(\d[\w.]*)", s3fs or "")
    return f"s3fs {found.group(1)}" if found else s3fs


def _median_of(runs: list[dict], field: str) -> float | None:
    values = [r[field] for r in runs if "error" not in r and r.get(field) is not None]
    return statistics.median(values) if values else None


def _rss_table(result: dict, present: list[str]) -> list[str]:
    mounts = [c for c in present if c in MOUNT_CLIENTS]
    if not mounts:
        return []
    lines = ["", ("Peak RSS of the mount process (VmHWM just before unmount, MiB, median of the runs; lower is "
                  "better):"), "",
             "| workload | " + " | ".join(CLIENT_LABELS[c] for c in mounts) + " | Pail/s3fs | Pail/rclone |",
             "|---|" + "---:|" * len(mounts) + "---:|---:|"]
    for name, w in result["workloads"].items():
        found = {c: _median_of(w["clients"].get(c, {}).get("runs", []), "peak_rss_mib") for c in mounts}
        if all(v is None for v in found.values()):
            continue
        pail = found.get("pail")
        ratio = {peer: _fmt(pail / found[peer]) if pail is not None and found.get(peer) else "–"
                 for peer in ("s3fs", "rclone")}
        lines.append(f"| {name} | " + " | ".join(_fmt(found[c]) for c in mounts) + f" | {ratio['s3fs']} | "
                     f"{ratio['rclone']} |")
    return lines


def chart(result: dict, path) -> bool:
    """A grouped bar chart, one panel per row of the table (absolute values with their unit,
    min–max as error bars), plus one for peak RSS. False when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"pail": "#2a7ab0", "pail-cache": "#7fb6dd", "pail-dio": "#5a9fd0", "pail-crt": "#1d4f72",
              "s3fs": "#e08a2c", "rclone": "#4d9e4d", "rclone-modtime": "#96c996", "raw": "#888888"}
    panels = []
    for row in rows(list(result["workloads"])):
        clients = result["workloads"][row.workload]["clients"]
        bars = [(c, clients[c]["summaries"][row.field]) for c in CLIENT_LABELS
                if clients.get(c, {}).get("summaries", {}).get(row.field)]
        if bars:
            title = textwrap.fill(_labels(row, result["config"]), 52)
            panels.append((f"{title}\n{row.unit}, {row.better} is better", bars))
    rss = []
    for c in MOUNT_CLIENTS:
        values = [r["peak_rss_mib"] for w in result["workloads"].values() for r in w["clients"].get(c, {}).get(
            "runs", []) if r.get("peak_rss_mib") is not None]
        if values:
            rss.append((c, {"median": statistics.median(values), "min": min(values), "max": max(values)}))
    if rss:
        panels.append(("peak RSS of the mount process, all runs\nMiB, lower is better", rss))
    if not panels:
        return False
    ncols = 4
    nrows = (len(panels) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.4 * nrows), squeeze=False)
    for ax, (title, bars) in zip(axes.flat, panels):
        names = [c for c, _ in bars]
        medians = [s["median"] for _, s in bars]
        low = [s["median"] - s["min"] for _, s in bars]
        high = [s["max"] - s["median"] for _, s in bars]
        ax.bar(range(len(bars)), medians, yerr=[low, high], capsize=3,
               color=[colors[c] for c in names])
        ax.set_xticks(range(len(bars)), [CLIENT_LABELS[c].replace(" --use-server-modtime", "\n(server modtime)")
                                         .replace(" --cache", "\n--cache") for c in names], fontsize=8)
        for x, (v, (_, s)) in enumerate(zip(medians, bars)):  # above the error bar, not on it
            ax.annotate(_fmt(v), (x, s["max"]), ha="center", va="bottom", fontsize=8, xytext=(0, 2),
                        textcoords="offset points")
        ax.set_title(title, fontsize=9)
        ax.margins(y=0.15)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"Pail vs s3fs, rclone mount and a raw S3 client, SeaweedFS on 127.0.0.1, median of "
                 f"{result['config']['runs']} runs (bars: min–max), {result['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    """Render compare.md and compare.png again from a compare.json (after a change here)."""
    import argparse
    import json
    from pathlib import Path

    parser = argparse.ArgumentParser(prog="python -m bench.report", description=main.__doc__)
    parser.add_argument("json", help="a compare.json written by bench.compare")
    path = Path(parser.parse_args(argv).json)
    result = json.loads(path.read_text())
    table = markdown(result)
    path.with_name("compare.md").write_text(table)
    chart(result, path.with_name("compare.png"))
    print(table, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
