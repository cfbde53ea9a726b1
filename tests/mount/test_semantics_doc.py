"""docs/SEMANTICS.md's examples, run as written against a real mount.

The bucket comes from the doc's key table, the mount options from its `pail mount` line,
and every `$ command` in a ```console block must print exactly the lines below it.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from tests.support.mounts import PailMount

DOC = Path(__file__).resolve().parents[2] / "docs" / "SEMANTICS.md"


def parse_doc(text: str):
    examples = text.split("## Examples", 1)[1]
    objects = {}
    for key, content in re.findall(r"^\| `([^`]+)` \| (?:`([^`]*)`)? *\|$", examples, re.M):
        objects[key] = (content + "\n").encode() if content else b""  # one line of text
    mount_line = re.search(r"^pail mount (\S+) (\S+)(.*)$", examples, re.M)
    options = shlex.split(mount_line.group(3))
    sessions = []
    for block in re.findall(r"```console\n(.*?)```", examples, re.S):
        commands, current = [], None
        for line in block.splitlines():
            if line.startswith("$ "):
                current = (line[2:], [])
                commands.append(current)
            else:
                current[1].append(line)
        sessions.extend(commands)
    return objects, options, sessions


OBJECTS, OPTIONS, SESSIONS = parse_doc(DOC.read_text())


def test_the_doc_has_examples():
    assert len(OBJECTS) >= 8 and "--uid" in OPTIONS and len(SESSIONS) >= 10


@pytest.fixture(scope="module")
def example_mount(moto_server, tmp_path_factory):
    """One mount for all examples, which run in order like one shell session, on moto:
    the example bucket holds keys SeaweedFS cannot store."""
    s3 = moto_server.client()
    bucket = moto_server.create_bucket()
    for key, content in OBJECTS.items():
        s3.put_object(Bucket=bucket, Key=key, Body=content)
    base = tmp_path_factory.mktemp("semantics")
    mount = PailMount(bucket=bucket, path=base / "mnt", endpoint=moto_server.endpoint,
                      env=moto_server.env(), args=OPTIONS, log_path=base / "mnt.log")
    try:
        yield mount.start()
    finally:
        mount.stop()


@pytest.mark.parametrize("command,expected", SESSIONS, ids=[c for c, _ in SESSIONS])
def test_example(example_mount, command, expected):
    result = subprocess.run(["bash", "-c", command], cwd=example_mount.path, capture_output=True,
                            text=True, env={"LC_ALL": "C", "PATH": "/usr/bin:/bin"}, timeout=60)
    output = (result.stdout + result.stderr).splitlines()
    assert output == expected
