"""The README's first command ends in scripts/demo.py: it must keep working."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_demo_runs_and_shows_the_files_both_ways():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "demo.py")], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:]
    out = result.stdout
    assert "Hello from S3!" in out, "pail mount showed README.txt"
    assert "Revenue grew in both regions." in out, "the pod's volume showed reports/summary.md"
    assert "-> OK: the mount answers at the target path" in out
    assert "target path exists afterwards: False" in out
