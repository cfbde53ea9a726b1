"""The demo: a local S3 server, a bucket of sample files, `pail mount`, a look around,
`pail unmount`; then the same bucket published into a "pod" through the CSI node server,
as kubelet does it. Everything stays on 127.0.0.1 and in a temporary directory."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from csi import csi_pb2  # noqa: E402  (after the path is set)
from tests.support.kubelet import Kubelet, NodeServer  # noqa: E402
from tests.support.s3server import start_seaweedfs  # noqa: E402

PAIL = str(Path(sys.executable).parent / "pail")
SAMPLES = {
    "README.txt": b"Hello from S3! These files are objects in the bucket 'demo-bucket'.\n",
    "reports/2024/q1.csv": b"region,revenue\neu,1200\nus,3400\n",
    "reports/2024/q2.csv": b"region,revenue\neu,1500\nus,3900\n",
    "reports/summary.md": b"# Summary\nRevenue grew in both regions.\n",
    "images/logo.svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"/>\n',
    "empty-folder/": b"",  # what the S3 console's "Create folder" writes
}


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def run(command: str, cwd: Path, env: dict[str, str], check: bool = True) -> None:
    print(f"$ {command}", flush=True)
    result = subprocess.run(command, shell=True, cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    print(result.stdout, end="", flush=True)
    if check and result.returncode != 0:
        raise SystemExit(f"demo: '{command}' failed with status {result.returncode}")


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="pail-demo-") as tmp:
        work = Path(tmp)
        say("Starting a local S3 server (SeaweedFS, listening on 127.0.0.1 only)")
        server = start_seaweedfs(work / "s3")
        mountpoint = work / "bucket"
        mountpoint.mkdir()
        env = {**os.environ, **server.env(), "PATH": f"{Path(PAIL).parent}:{os.environ['PATH']}"}
        try:
            print(f"S3 endpoint: {server.endpoint}")
            say("Creating bucket 'demo-bucket' with a few files and folders")
            s3 = server.client()
            s3.create_bucket(Bucket="demo-bucket")
            for key, body in SAMPLES.items():
                s3.put_object(Bucket="demo-bucket", Key=key, Body=body)
                print(f"  put s3://demo-bucket/{key} ({len(body)} bytes)")

            say("Mounting it with pail mount (returns once the mount answers)")
            run(f"pail mount demo-bucket {shlex.quote(str(mountpoint))} --endpoint-url {server.endpoint}",
                cwd=work, env=env)
            run(f"mount | grep {shlex.quote(str(mountpoint))}", cwd=work, env=env)

            say("Listing and reading through the mount")
            run("ls -l", cwd=mountpoint, env=env)
            run("find . | sort", cwd=mountpoint, env=env)
            run("cat README.txt", cwd=mountpoint, env=env)
            run("cat reports/2024/q1.csv reports/2024/q2.csv", cwd=mountpoint, env=env)
            run("stat -c '%n: %s bytes, %F, mode %A' reports/summary.md empty-folder", cwd=mountpoint, env=env)

            say("Writing: a new file becomes one object when it is closed")
            run("printf 'region,revenue\\neu,1800\\nus,4100\\n' > reports/2024/q3.csv", cwd=mountpoint, env=env)
            run("cat reports/2024/q3.csv", cwd=mountpoint, env=env)
            print("  in S3:", [o["Key"] for o in s3.list_objects_v2(Bucket="demo-bucket", Prefix="reports/2024/")["Contents"]])

            say("What S3 cannot do is refused with a clear error (docs/SEMANTICS.md)")
            run("echo more >> README.txt", cwd=mountpoint, env=env, check=False)
            run("mv README.txt README.md", cwd=mountpoint, env=env, check=False)

            say("Unmounting")
            run(f"pail unmount {shlex.quote(str(mountpoint))}", cwd=work, env=env)
            run(f"ls -A {shlex.quote(str(mountpoint))}; echo '(empty again)'", cwd=work, env=env)

            kubelet_demo(work, server)
        finally:
            if os.path.ismount(mountpoint):
                subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)
            say("Stopping the S3 server")
            server.stop()
    print("\nDone. Next: ./scripts/test runs the whole test suite.")


def kubelet_demo(work: Path, server) -> None:
    """Publish the bucket the way kubelet does for a pod's volume: NodePublishVolume over
    the node server's unix socket, at kubelet's target path; then NodeUnpublishVolume."""
    say("Starting the CSI node server (pail csi node), as the DaemonSet does on each node")
    node = NodeServer(root=work / "node", env=server.env())
    print(f"$ pail csi node --endpoint unix://{node.socket} --node-id demo-node "
          f"--kubelet-dir {node.kubelet_dir} --state-dir {node.state_dir}")
    node.start()
    try:
        kubelet = Kubelet(node)
        pod = kubelet.new_pod("demo-app")
        attributes = {"bucketName": "demo-bucket", "prefix": "reports/", "endpoint": server.endpoint,
                      "region": server.region}
        request = kubelet.publish_request(pod, "demo-pv", attributes, fs_group="2000")
        say("kubelet: NodePublishVolume for pod demo-app's volume demo-pv (prefix reports/, fsGroup 2000)")
        print(f"  volume_id: {request.volume_id}\n  target_path: {request.target_path}\n"
              f"  volume_capability: mount, fsGroup {request.volume_capability.mount.volume_mount_group}, "
              f"{csi_pb2.VolumeCapability.AccessMode.Mode.Name(request.volume_capability.access_mode.mode)}\n"
              f"  volume_context: {json.dumps(dict(sorted(request.volume_context.items())), indent=4)}"
              .replace("\n}", "\n  }"))
        kubelet.stub.NodePublishVolume(request, timeout=90)
        target = Path(request.target_path)
        print("  -> OK: the mount answers at the target path")
        env = {**os.environ}
        run(f"mount | grep {shlex.quote(str(target))}", cwd=work, env=env)
        say("What the pod sees at its volume path")
        run("ls -ln . 2024", cwd=target, env=env)
        run("cat summary.md", cwd=target, env=env)

        say("kubelet: NodePublishVolume again (requiresRepublish): the same mount, nothing new")
        kubelet.stub.NodePublishVolume(request, timeout=90)
        run(f"grep -c {shlex.quote(str(target))} /proc/self/mountinfo", cwd=work, env=env)

        say("kubelet: NodeUnpublishVolume when the pod is gone")
        kubelet.unpublish(pod, "demo-pv")
        print(f"  target path exists afterwards: {target.exists()}")
    finally:
        say("Stopping the node server")
        node.stop()


if __name__ == "__main__":
    main()
