"""One mount: mount the filesystem, serve kernel requests until unmounted or signalled,
then unmount and release everything.

pyfuse3 keeps one FUSE session per process, so a process serves exactly one mount.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

import pyfuse3
import structlog
import trio

from driver.config import MountConfig
from driver.fs.core import Filesystem
from driver.fuse.adapter import Operations
from driver.mountpoint import mount_device
from driver.s3.api import ObjectClient

log = structlog.get_logger("pail.session")

# The kernel's default of 128 KiB makes FUSE reads of large files wait on the next request
# far too often; 1 MiB lets it keep several 128 KiB reads in flight (2.5 GB/s through
# pyfuse3 from memory, against 0.75 GB/s, measured on the 2-core development machine).
READ_AHEAD_KB = 1024


def fuse_options(config: MountConfig) -> set[str]:
    fsname = config.s3.bucket + ("/" + config.fs.prefix.rstrip("/") if config.fs.prefix else "")
    options = {
        "fsname=" + fsname.replace(",", "_"),
        "subtype=pail",
        # The kernel checks access against the mount-wide uid, gid and modes. Without it,
        # allow_other would let every user past the modes.
        "default_permissions",
        "noatime",
    }
    if config.fs.read_only:
        options.add("ro")  # the kernel then refuses every change with EROFS itself
    if config.allow_other:
        options.add("allow_other")
    if config.allow_root:
        options.add("allow_root")
    return options


def tune_read_ahead(mountpoint: str) -> None:
    # The device number comes from mountinfo: a stat() of the mount point would be a FUSE
    # request that this very process must answer, before its loop runs.
    device = mount_device(mountpoint)
    path = f"/sys/class/bdi/{device}/read_ahead_kb"
    try:
        with open(path, "w") as knob:
            knob.write(str(READ_AHEAD_KB))
    except OSError as exc:  # not root, or no sysfs: slower large reads, nothing worse
        log.info("could not raise read-ahead", path=path, error=exc.strerror)


async def serve(config: MountConfig, client: ObjectClient, on_ready: Callable[[], None]) -> None:
    """Mount, call ``on_ready`` once the mount answers, serve until unmounted or a signal."""
    fs = Filesystem(client, config.fs)
    operations = Operations(fs, config.mountpoint)
    # SIGINT and SIGTERM are ours until the end, clean-up included: a second signal while
    # stopping (which waits for requests in flight, up to --request-timeout) must not kill
    # the process with the mount still there and uploads not yet aborted.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        pyfuse3.init(operations, config.mountpoint, fuse_options(config))
        unmounted = False
        try:
            async with trio.open_nursery() as nursery:
                fs.start(nursery)
                nursery.start_soon(_stop_on_signal, signals)
                nursery.start_soon(_report_ready, config.mountpoint, on_ready)
                await pyfuse3.main()
                # main() returns when the kernel ends the session (unmount) or on terminate().
                nursery.cancel_scope.cancel()
        finally:
            try:
                pyfuse3.close(unmount=True)
                unmounted = True
            finally:
                await fs.aclose()
                log.info("unmounted", mountpoint=config.mountpoint, clean=unmounted,
                         object_memory_peak=fs.budget.peak, object_memory_limit=fs.budget.limit)


async def _report_ready(mountpoint: str, on_ready: Callable[[], None]) -> None:
    # A stat from another thread is a real kernel round trip: once it returns, the mount
    # answers requests.
    await trio.to_thread.run_sync(os.stat, mountpoint)
    # After the first request: the kernel sets the read-ahead from the FUSE INIT reply.
    tune_read_ahead(mountpoint)
    log.info("mounted", mountpoint=mountpoint)
    on_ready()


async def _stop_on_signal(signals) -> None:
    stopping = False
    async for signum in signals:
        if stopping:
            log.info("already stopping", signal=signal.Signals(signum).name)
            continue
        log.info("stopping", signal=signal.Signals(signum).name)
        pyfuse3.terminate()
        stopping = True
