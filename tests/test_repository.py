"""The repository itself: its tracked files must fit the GPU machine's working-tree limit.

The device machine (README.md, "On a GPU: the prepared check") takes a working tree of at most
64 MiB, counting the tracked files and whatever is carried beside them (.whl/, the wheels of
benchmarks/gpu/wheels.sh). The tracked files are kept under 60 MB so that the wheels and some growth fit.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_TRACKED_BYTES = 60 * 1000 * 1000
DEVICE_TREE_BYTES = 64 * 1024 * 1024  # the device tool's limit on what travels


def tracked_sizes() -> dict[str, int]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: no tracked files to measure")
    names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    paths = [ROOT / n.decode() for n in names if n]
    return {str(p.relative_to(ROOT)): p.stat().st_size for p in paths if p.is_file()}


def test_tracked_files_fit_under_the_limit():
    sizes = tracked_sizes()
    total = sum(sizes.values())
    largest = sorted(sizes.items(), key=lambda kv: -kv[1])[:5]
    assert total < MAX_TRACKED_BYTES, (
        f"the tracked files take {total / 1e6:.1f} MB, over the {MAX_TRACKED_BYTES / 1e6:.0f} MB that leaves room for "
        f"the wheels the GPU machine needs (64 MiB in all); largest: {largest}. Store weights in float16 "
        "(python -m training convert --dtype float16) or keep large files out of git"
    )


def test_tree_and_carried_wheels_fit_the_device():
    """With .whl/ prepared (benchmarks/gpu/wheels.sh), the tree and the wheels travel together."""
    wheels = ROOT / ".whl"
    if not wheels.is_dir():
        pytest.skip(".whl/ not prepared (benchmarks/gpu/wheels.sh)")
    total = sum(tracked_sizes().values()) + sum(p.stat().st_size for p in wheels.rglob("*") if p.is_file())
    assert total < DEVICE_TREE_BYTES, f"tree and wheels take {total / 2**20:.1f} MiB, over the device's 64 MiB"
