"""The ``pail`` command: ``pail mount BUCKET DIR`` and ``pail unmount DIR``.

``pail mount`` checks everything it can before mounting (options, the directory, the
bucket and the credentials) and says what is wrong in one line. Without --foreground it
forks the mount process and returns once the mount answers, or with that process's
error (and no mount left behind).
"""

from __future__ import annotations

import argparse
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from urllib.parse import urlsplit

from driver import __version__
from driver import log as logging_setup
from driver import readiness
from driver.config import (
    ConfigError,
    FsSettings,
    SSE_MODES,
    MountConfig,
    S3Settings,
    data_path,
    normalize_prefix,
    parse_id,
    parse_mode,
    parse_quantity,
    parse_seconds,
    parse_size,
    parse_ttl,
    validate_bucket,
)
from driver.mountpoint import check_mount_directory, is_mount_point, resolve

EXIT_FAILURE = 1
EXIT_USAGE = 2
# Where the EKS Pod Identity Agent answers on every node (a link-local address).
DEFAULT_POD_IDENTITY_AGENT = "http://169.254.170.23/v1/credentials"
READY_TIMEOUT = 60.0  # seconds a background mount may take to answer


class CommandError(Exception):
    """The command cannot go on; the message is the one line the user sees, the kind
    (driver.readiness) what a program that started the mount is told."""

    def __init__(self, message: str, kind: str = readiness.INTERNAL) -> None:
        super().__init__(message)
        self.kind = kind


class _StrictParser(argparse.ArgumentParser):
    """For options that come from a program (the CSI node server), not a terminal:
    a mistake raises ConfigError instead of printing usage and exiting."""

    def error(self, message: str):  # type: ignore[override]
        raise ConfigError("mount options", message)


def build_parser(strict: bool = False) -> argparse.ArgumentParser:
    parser_class = _StrictParser if strict else argparse.ArgumentParser
    parser = parser_class(prog="pail", description="Mount S3 buckets as file systems.")
    parser.add_argument("--version", action="version", version=f"pail {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    mount = commands.add_parser("mount", help="mount a bucket on a directory",
                                description="Mount BUCKET (a name, access-point alias or ARN) on DIR.")
    mount.add_argument("bucket", metavar="BUCKET")
    mount.add_argument("directory", metavar="DIR")
    where = mount.add_argument_group("bucket")
    where.add_argument("--prefix", default="", help="mount only the keys under this prefix")
    where.add_argument("--endpoint-url", help="S3 endpoint, for S3-compatible stores (http[s]://host[:port])")
    where.add_argument("--region", help="the bucket's region (default: asked of the bucket)")
    where.add_argument("--force-path-style", action="store_true",
                       help="address the bucket in the URL path, not the host name")
    where.add_argument("--no-sign-request", action="store_true",
                       help="send requests unsigned, for public buckets")
    where.add_argument("--ca-bundle", help="PEM file of CA certificates to trust for TLS")
    where.add_argument("--credentials-file", metavar="FILE",
                       help="take credentials from this JSON file (0600), re-read when it is replaced, "
                            "instead of the standard AWS chain (see docs/CREDENTIALS.md)")
    where.add_argument("--request-timeout", default="30",
                       help="seconds an S3 request may go unanswered before it fails with EIO "
                            "(default 30)")
    files = mount.add_argument_group("files")
    files.add_argument("--read-only", action="store_true", help="refuse every change")
    files.add_argument("--allow-overwrite", action="store_true",
                       help="let open(O_TRUNC) of an existing file replace its object")
    files.add_argument("--allow-delete", action="store_true", help="let unlink delete objects")
    files.add_argument("--write-part-size", default="8MiB",
                       help="part size of uploads (default 8MiB; a file can have 10,000 parts, so "
                            "this caps file size at 10,000 times it: 78 GiB by default)")
    files.add_argument("--uid", help="owner of every file and directory (default: yours)")
    files.add_argument("--gid", help="group of every file and directory (default: yours)")
    files.add_argument("--file-mode", default="0644", help="permission bits of files (default 0644)")
    files.add_argument("--dir-mode", default="0755", help="permission bits of directories (default 0755)")
    files.add_argument("--allow-other", action="store_true", help="let other users use the mount")
    files.add_argument("--allow-root", action="store_true", help="let root use the mount")
    files.add_argument("--metadata-ttl", default="1",
                       help="seconds to trust cached names and attributes: a number, 'minimal' "
                            "(0: ask S3 every time) or 'indefinite' (default 1)")
    files.add_argument("--max-memory", default="256MiB",
                       help="memory for prefetched data of all open files (default 256MiB)")
    files.add_argument("--cache", metavar="DIR",
                       help="keep object data read on local disk in DIR, for programs that read the same "
                            "data again (default: no cache)")
    files.add_argument("--max-cache-size", help="disk space the --cache may use (default 1GiB)")
    files.add_argument("--direct-io", action="store_true",
                       help="read files past the kernel's page cache: faster large reads, but a shared "
                            "mmap of a file fails (ENODEV) and every read() is a request to the mount "
                            "(default: off)")
    files.add_argument("--no-block-fill", dest="block_fill", action="store_false",
                       help="never fetch a whole 8 MiB block into the page cache for random reads that "
                            "keep coming back to it (default: fill at the second read in a block)")
    objects = mount.add_argument_group("objects")
    objects.add_argument("--storage-class", help="storage class of new objects (e.g. STANDARD_IA)")
    objects.add_argument("--sse", choices=SSE_MODES, help="server-side encryption of new objects")
    objects.add_argument("--sse-kms-key-id", help="KMS key for --sse aws:kms (default: the AWS managed key)")
    objects.add_argument("--requester-pays", action="store_true",
                         help="accept the request charges of a requester-pays bucket")
    objects.add_argument("--expected-bucket-owner", help="refuse a bucket not owned by this AWS account id")
    objects.add_argument("--upload-checksums", choices=("crc32c", "off"), default="crc32c",
                         help="send a CRC32C of every upload for S3 to check (default crc32c)")
    run = mount.add_argument_group("process")
    run.add_argument("--foreground", action="store_true", help="stay in the foreground until unmounted")
    run.add_argument("--debug", action="store_true", help="log every file operation")
    run.add_argument("--log-format", choices=logging_setup.FORMATS, default="console",
                     help="log lines as JSON or for a console (default console)")
    run.add_argument("--log-file", help="append logs to this file (default: stderr in the "
                                        "foreground, syslog in the background)")
    run.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)

    unmount = commands.add_parser("unmount", help="unmount a directory mounted by pail mount")
    unmount.add_argument("directory", metavar="DIR")

    csi = commands.add_parser("csi", help="serve the CSI driver (Kubernetes)")
    roles = csi.add_subparsers(dest="role", required=True, metavar="ROLE")
    for role, text in (("node", "the node server: mounts volumes for kubelet"),
                       ("controller", "the controller server: creates and deletes volumes")):
        serve = roles.add_parser(role, help=text)
        serve.add_argument("--endpoint", required=True, help="unix:///path/to/csi.sock")
        serve.add_argument("--log-format", choices=logging_setup.FORMATS, default="json",
                           help="log lines as JSON or for a console (default json)")
        serve.add_argument("--debug", action="store_true", help="log requests and every mount's operations")
        if role == "node":
            serve.add_argument("--node-id", required=True, help="this node's name (NodeGetInfo)")
            serve.add_argument("--state-dir", default="/var/lib/pail",
                               help="records of the mounts made, to find them after a restart")
            serve.add_argument("--cache-dir",
                               help="where volumes with the 'cache' mount option keep object data, "
                                    "a directory of their own each (default: STATE_DIR/cache)")
            serve.add_argument("--cache-capacity",
                               help="refuse a publish whose max-cache-size would take the caches of all "
                                    "mounts past this, a quantity such as 20Gi (default: no limit)")
            serve.add_argument("--kubelet-dir", default="/var/lib/kubelet",
                               help="kubelet's root directory: targets must be under it")
            serve.add_argument("--enable-ephemeral", action="store_true",
                               help="allow inline ephemeral volumes (with pod-level credentials only)")
            serve.add_argument("--controller", action="store_true", help="serve the controller service too")
            serve.add_argument("--metrics-port", type=int, default=0,
                               help="serve Prometheus metrics of the node and all its mounts on this "
                                    "port, at /metrics (default 0: none)")
            serve.add_argument("--metrics-address", default="0.0.0.0",
                               help="address the metrics port listens on (default 0.0.0.0)")
            pod = serve.add_argument_group("pod-level credentials (authenticationSource: pod)")
            pod.add_argument("--sts-endpoint-url", help="STS endpoint for AssumeRoleWithWebIdentity "
                                                        "(default: the regional endpoint)")
            pod.add_argument("--sts-region", help="STS region when a volume sets no stsRegion "
                                                  "(default: the volume's region, else AWS_REGION)")
            pod.add_argument("--pod-identity-agent-url", default=DEFAULT_POD_IDENTITY_AGENT,
                             help="EKS Pod Identity Agent; 'none' to turn EKS Pod Identity off "
                                  f"(default {DEFAULT_POD_IDENTITY_AGENT})")
            pod.add_argument("--kubeconfig", help="read ServiceAccounts through this kubeconfig "
                                                  "(default: in-cluster configuration)")
            serve.add_argument("--no-supervisor", action="store_true", help=argparse.SUPPRESS)
        # DeleteVolume gets only a volume id, so dynamic volumes live where the controller's
        # own S3 settings point (nodes are told in the volume context), not a StorageClass's.
        s3 = serve.add_argument_group("controller S3 access" + (" (with --controller)" if role == "node" else ""),
                                      "credentials come from the standard AWS chain (environment, IRSA, "
                                      "EKS Pod Identity)")
        s3.add_argument("--s3-endpoint-url", help="S3 endpoint of dynamic volumes, for S3-compatible stores "
                                                  "(http[s]://host[:port]; default: AWS S3)")
        s3.add_argument("--s3-region", help="region of new buckets and of requests "
                                            "(default: AWS_REGION, else us-east-1)")
        s3.add_argument("--s3-force-path-style", action="store_true",
                        help="address buckets in the URL path (also on the nodes, for dynamic volumes)")
    return parser


def parse_mount_options(bucket: str, directory: str, options: Sequence[str]) -> MountConfig:
    """The MountConfig ``pail mount BUCKET DIR OPTIONS`` would use; ConfigError if not."""
    return config_from_args(build_parser(strict=True).parse_args(["mount", bucket, directory, *options]))


def config_from_args(args: argparse.Namespace) -> MountConfig:
    """Validate every option; ConfigError names the one that is wrong."""
    data_path()
    if args.endpoint_url:
        parts = urlsplit(args.endpoint_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError("--endpoint-url", f"expected http(s)://host[:port], not {args.endpoint_url!r}")
    if args.ca_bundle and not os.path.isfile(args.ca_bundle):
        raise ConfigError("--ca-bundle", f"{args.ca_bundle}: no such file")
    if args.credentials_file and not os.path.isfile(args.credentials_file):
        raise ConfigError("--credentials-file", f"{args.credentials_file}: no such file")
    if args.credentials_file and args.no_sign_request:
        raise ConfigError("--credentials-file", "cannot be combined with --no-sign-request")
    if args.allow_other and args.allow_root:
        raise ConfigError("--allow-root", "cannot be combined with --allow-other (which includes root)")
    s3 = S3Settings(
        bucket=validate_bucket(args.bucket),
        region=args.region or None,
        endpoint_url=args.endpoint_url or None,
        force_path_style=args.force_path_style,
        no_sign_request=args.no_sign_request,
        ca_bundle=args.ca_bundle or None,
        credentials_file=args.credentials_file or None,
        request_timeout=parse_seconds(args.request_timeout, "--request-timeout"),
        requester_pays=args.requester_pays,
        expected_bucket_owner=args.expected_bucket_owner,
        storage_class=args.storage_class,
        sse=args.sse,
        sse_kms_key_id=args.sse_kms_key_id,
        upload_checksum=None if args.upload_checksums == "off" else "CRC32C",
    )
    fs = FsSettings(
        prefix=normalize_prefix(args.prefix),
        read_only=args.read_only,
        uid=parse_id(args.uid, "--uid") if args.uid is not None else os.getuid(),
        gid=parse_id(args.gid, "--gid") if args.gid is not None else os.getgid(),
        file_mode=parse_mode(args.file_mode, "--file-mode"),
        dir_mode=parse_mode(args.dir_mode, "--dir-mode"),
        metadata_ttl=parse_ttl(args.metadata_ttl),
        max_memory=parse_size(args.max_memory, "--max-memory"),
        cache_dir=_cache_dir(args),
        max_cache_size=parse_size(args.max_cache_size or "1GiB", "--max-cache-size"),
        direct_io=args.direct_io,
        block_fill=args.block_fill,
        write_part_size=parse_size(args.write_part_size, "--write-part-size"),
        allow_overwrite=args.allow_overwrite,
        allow_delete=args.allow_delete,
    )
    return MountConfig(
        s3=s3, fs=fs, mountpoint=os.path.realpath(args.directory),
        allow_other=args.allow_other, allow_root=args.allow_root, foreground=args.foreground,
        debug=args.debug, log_format=args.log_format, log_file=args.log_file,
    )


def _cache_dir(args: argparse.Namespace) -> str | None:
    if args.max_cache_size is not None and not args.cache:
        raise ConfigError("--max-cache-size", "needs --cache DIR")
    if not args.cache:
        return None
    cache = os.path.realpath(args.cache)
    mountpoint = os.path.realpath(args.directory)
    if cache == mountpoint or cache.startswith(mountpoint.rstrip("/") + "/"):
        # Reads of the mount would wait on writes to the mount: a deadlock.
        raise ConfigError("--cache", f"{args.cache} is inside the mount directory")
    return cache


def _check_before_mount(config: MountConfig):
    """Everything that can be checked before mounting; returns the bucket's region and
    the botocore session that found it (with its credentials)."""
    from driver.s3 import api
    from driver.s3.client import check_bucket, describe_bucket_error, detect_region

    problem = check_mount_directory(config.mountpoint)
    if problem:
        raise CommandError(problem, readiness.DIRECTORY)
    from driver import credentials

    try:
        session = credentials.session(config.s3.credentials_file)  # one session: models load once
    except credentials.CredentialError as exc:
        raise CommandError(str(exc), readiness.kind_of_credentials(exc.kind)) from None
    region = detect_region(config.s3, session)
    try:
        check_bucket(config.s3, region, session)
    except api.ObjectClientError as exc:
        raise CommandError(describe_bucket_error(exc, config.s3), readiness.kind_of(exc)) from None
    return region, session


def mount(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if not config.foreground:
        # The forked mount process checks the bucket and says why it cannot mount;
        # checking here too would double the wait (importing botocore, a HeadBucket).
        problem = check_mount_directory(config.mountpoint)
        if problem:
            raise CommandError(problem, readiness.DIRECTORY)
        # Returns in both processes: here once the mount answered, in the mount process
        # with the pipe it answers on, as a node-started mount gets it with --ready-fd.
        args.ready_fd = _fork_mount_process(config.mountpoint)
        if args.ready_fd is None:
            return 0
    region, session = _check_before_mount(config)
    cache = _open_cache(config)
    from driver.mount import run_mount

    logging_setup.configure(config.log_format, debug=config.debug, path=config.log_file,
                            syslog=args.ready_fd is not None)
    return run_mount(config, region, session, ready_fd=args.ready_fd, cache=cache)


def _open_cache(config: MountConfig):
    """The mount's BlockStore (None without --cache), locked and emptied, before mounting."""
    if config.fs.cache_dir is None:
        return None
    from driver.fs.cache import BlockStore, CacheDirError

    try:
        return BlockStore.open(config.fs.cache_dir, config.fs.max_cache_size)
    except CacheDirError as exc:
        raise CommandError(f"--cache: {exc}", readiness.INVALID) from None


def _fork_mount_process(mountpoint: str) -> int | None:
    """Fork the mount process, in a new session, and wait until it answers: None here
    once it is live (CommandError when it is not, and no mount left at ``mountpoint``);
    in the mount process, the pipe's end to answer on.

    Forked, not started afresh: a new interpreter would start and import this module
    again (about 0.07 s of a mount's 0.5–0.7 s start, docs/ARCHITECTURE.md). Nothing
    here has started a thread yet, so the fork is safe."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)
        return write_end
    os.close(write_end)
    deadline = time.monotonic() + READY_TIMEOUT
    message = b""
    ended = False
    with os.fdopen(read_end, "rb") as ready:
        while b"\n" not in message and time.monotonic() < deadline:
            readable, _, _ = select.select([ready], [], [], max(0.0, deadline - time.monotonic()))
            if not readable:
                break
            chunk = os.read(ready.fileno(), 4096)
            if not chunk:
                ended = True  # the mount process ended without a word
                break
            message += chunk
    line = message.decode("utf-8", "replace").strip()
    if not line:
        # An ending process closes its pipe a moment before it can be waited for.
        code = _exit_code_within(pid, 5.0 if ended else 0.0)
        if code is None:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            _detach_left(mountpoint)
            raise CommandError(f"the mount did not answer within {READY_TIMEOUT:.0f} s")
        _detach_left(mountpoint)
        raise CommandError(f"the mount process exited with status {code}")
    error = readiness.parse(line)
    if error is not None:
        raise CommandError(error[1], error[0])
    return None


def _detach_left(mountpoint: str) -> None:
    """A mount process that had mounted and then ended or was killed leaves its mount
    behind, every access to it failing with ENOTCONN; the directory was no mount point
    before (check_mount_directory), so a mount there now is that one."""
    if is_mount_point(mountpoint):
        subprocess.run(_unmount_command(mountpoint, lazy=True), capture_output=True, check=False)


def _unmount_command(path: str, *, lazy: bool = False) -> list[str]:
    """fusermount3 (or fusermount, or umount) for ``path``; ``lazy``: detached even while busy
    or dead."""
    fusermount = shutil.which("fusermount3") or shutil.which("fusermount")
    if fusermount:
        return [fusermount, "-u", *(["-z"] if lazy else []), path]
    return ["umount", *(["-l"] if lazy else []), path]


def _exit_code_within(pid: int, seconds: float) -> int | None:
    deadline = time.monotonic() + seconds
    while True:
        ended, status = os.waitpid(pid, os.WNOHANG)
        if ended:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.01)


def csi(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from pathlib import Path

    from driver.csi import server
    from driver.csi.volume_credentials import PodIdentitySettings

    logging_setup.configure(args.log_format, debug=args.debug)
    try:
        server.socket_path(args.endpoint)
    except ValueError as exc:
        raise ConfigError("--endpoint", str(exc)) from None
    node = args.role == "node"
    controller_settings = _controller_settings(args, node)
    pod_identity = PodIdentitySettings()
    if node:
        for option, value in (("--sts-endpoint-url", args.sts_endpoint_url),
                              ("--pod-identity-agent-url", args.pod_identity_agent_url)):
            parts = urlsplit(value or "")
            if value and value != "none" and (parts.scheme not in ("http", "https") or not parts.hostname):
                raise ConfigError(option, f"expected http(s)://host[:port][/path], not {value!r}")
        if not 0 <= args.metrics_port <= 65535:
            raise ConfigError("--metrics-port", f"must be a port number (0: no metrics), not {args.metrics_port}")
        if args.kubeconfig and not os.path.isfile(args.kubeconfig):
            raise ConfigError("--kubeconfig", f"{args.kubeconfig}: no such file")
        if args.cache_dir is not None and not os.path.isabs(args.cache_dir):
            # It is in every cached mount's command line and record: a restarted server
            # must name the same directory whatever its working directory.
            raise ConfigError("--cache-dir", f"must be an absolute path, not {args.cache_dir!r}")
        cache_capacity = parse_quantity(args.cache_capacity, "--cache-capacity") if args.cache_capacity else None
        pod_identity = PodIdentitySettings(
            sts_endpoint=args.sts_endpoint_url or None,
            sts_region=args.sts_region or os.environ.get("AWS_REGION") or None,
            pod_identity_agent_url=None if args.pod_identity_agent_url == "none" else args.pod_identity_agent_url)
        if not args.no_supervisor:  # checked first: a bad flag must not become a restart loop
            return server.supervise(server.server_command(list(argv)))
    server.serve(args.endpoint, node_id=args.node_id if node else None,
                 controller=not node or args.controller,
                 state_dir=Path(args.state_dir) if node else Path("/nonexistent"),
                 kubelet_dir=args.kubelet_dir if node else "", enable_ephemeral=node and args.enable_ephemeral,
                 pod_identity=pod_identity, kubeconfig=args.kubeconfig if node else None,
                 controller_settings=controller_settings,
                 metrics=(args.metrics_address, args.metrics_port) if node and args.metrics_port else None,
                 cache_dir=Path(args.cache_dir) if node and args.cache_dir else None,
                 cache_capacity=cache_capacity if node else None)
    return 0


def _controller_settings(args: argparse.Namespace, node: bool):
    """The controller's S3 settings (None without a controller), checked before serving."""
    given = [o for o, v in (("--s3-endpoint-url", args.s3_endpoint_url), ("--s3-region", args.s3_region),
                            ("--s3-force-path-style", args.s3_force_path_style)) if v]
    if node and not args.controller:
        if given:
            raise ConfigError(given[0], "configures the controller service: it needs --controller")
        return None
    from driver.csi.controller import ControllerSettings

    if args.s3_endpoint_url:
        parts = urlsplit(args.s3_endpoint_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError("--s3-endpoint-url", f"expected http(s)://host[:port], not {args.s3_endpoint_url!r}")
    return ControllerSettings(endpoint_url=args.s3_endpoint_url or None, region=args.s3_region or None,
                              force_path_style=args.s3_force_path_style)


def unmount(args: argparse.Namespace) -> int:
    path = resolve(args.directory)
    if not is_mount_point(path):
        raise CommandError(f"{path}: not mounted")
    result = subprocess.run(_unmount_command(path), capture_output=True, text=True)
    if result.returncode != 0:
        detail = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed"
        raise CommandError(f"{path}: {detail}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "mount":
            return mount(args)
        if args.command == "csi":
            return csi(args, argv)
        return unmount(args)
    except ConfigError as exc:
        if getattr(args, "ready_fd", None) is not None:
            _tell_parent(args.ready_fd, readiness.error_line(readiness.INVALID, str(exc)))
        parser.exit(EXIT_USAGE, f"pail {args.command}: error: {exc}\n")
    except CommandError as exc:
        if getattr(args, "ready_fd", None) is not None:
            _tell_parent(args.ready_fd, readiness.error_line(exc.kind, str(exc)))
        print(f"pail {args.command}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_FAILURE


def _tell_parent(fd: int, line: str) -> None:
    try:
        os.write(fd, (line + "\n").encode())
        os.close(fd)
    except OSError:
        pass

