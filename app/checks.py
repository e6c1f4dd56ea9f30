"""A cache of the batch-invariance checks' verdicts, so a replica that starts again is ready in seconds.

`Batcher.check_buckets` (app/batching.py) finds the pass sizes whose rows are bit-identical to a
pass of max_batch_size. Its verdict depends on nothing but what the key here records, so a verdict
found once is reused by every later start whose key is equal, and never where any part differs:

- the operation (`model:op[:prior]`) and the SHA-256 of every weight file it computes with (a
  prior's sampler decodes with its VQ-VAE: both files);
- the code that computes it: a digest of models/*.py and of the app modules that build and run
  the passes (CODE_FILES);
- the machine: torch's version and the kernels it picks (`torch.backends.cpu.get_cpu_capability`,
  the CPU's model name and flags from /proc/cpuinfo; on CUDA the device's name, compute
  capability, and the CUDA and cuDNN versions);
- the settings that change what runs: device type, torch threads per pass, max_batch_size,
  linear_min_rows, precision, and the candidate sizes and the check's seed. (With CUDA graphs
  the eager verdict is cached, and each start checks the recorded steps against it again.)

One JSON file per key, named by the key's SHA-256, holding the key itself (compared in full on
reading, so a collision or a hand-edited file is never trusted) and the verdict. A cache that
cannot be read or written costs only time: the check runs and the service serves as without it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
# What a verdict depends on in code: the models, and how the app builds, pads and runs their passes
CODE_FILES = ("app/operations.py", "app/batching.py", "app/graphs.py", "models/*.py")
FORMAT = 1  # of the cache files; a file of another format is ignored


@lru_cache
def code_digest() -> str:
    """SHA-256 over CODE_FILES (name and bytes, in sorted order)."""
    h = hashlib.sha256()
    for pattern in CODE_FILES:
        for path in sorted(ROOT.glob(pattern)):
            h.update(f"{path.relative_to(ROOT)}\0".encode())
            h.update(path.read_bytes())
    return h.hexdigest()


@lru_cache
def _cpu() -> dict[str, str]:
    """The CPU as the kernels see it: torch's dispatch level, and the model name and flags the kernel reports."""
    info = {"capability": torch.backends.cpu.get_cpu_capability(), "machine": platform.machine()}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {**info, "processor": platform.processor()}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "flags", "Features") and key not in info:  # Features: ARM's flags
            info[key] = " ".join(value.split())
    return info


def machine_key(device: torch.device) -> dict[str, Any]:
    """What the kernels a pass runs depend on, besides the code and the settings."""
    key: dict[str, Any] = {"torch": torch.__version__, "device_type": device.type}
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        key.update(
            cuda_device=torch.cuda.get_device_name(index),
            capability=list(torch.cuda.get_device_capability(index)),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    else:
        key["cpu"] = _cpu()
    return key


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (what `sha256sum` prints)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class VerdictCache:
    """Verdicts (pass sizes) by key, in `directory`; None: a cache that remembers nothing."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = Path(directory).expanduser() if directory is not None else None

    def _path(self, key: dict[str, Any]) -> Path:
        assert self.directory is not None
        name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
        return self.directory / f"{name}.json"

    def get(self, key: dict[str, Any]) -> tuple[int, ...] | None:
        """The verdict stored under exactly `key`, or None (none stored, unreadable, or another key)."""
        if self.directory is None:
            return None
        path = self._path(key)
        try:
            stored = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            log.warning("check cache: cannot read %s (%s); checking again", path, err)
            return None
        if not isinstance(stored, dict) or stored.get("format") != FORMAT or stored.get("key") != key:
            return None
        sizes = stored.get("pass_sizes")
        if not _valid_sizes(sizes, key):
            log.warning("check cache: %s holds pass sizes %r that cannot be this key's verdict; checking again", path, sizes)
            return None
        return tuple(sizes)

    def put(self, key: dict[str, Any], sizes: tuple[int, ...]) -> None:
        """Store a verdict (atomically: a reader sees the old file or the new one, never a part)."""
        if self.directory is None:
            return
        path = self._path(key)
        tmp: str | None = None
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=self.directory, suffix=".tmp", delete=False) as f:
                tmp = f.name
                json.dump({"format": FORMAT, "key": key, "pass_sizes": list(sizes)}, f, sort_keys=True)
            os.replace(tmp, path)
        except OSError as err:
            log.warning("check cache: cannot write %s (%s); the next start checks again", path, err)
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)


def _valid_sizes(sizes: Any, key: dict[str, Any]) -> bool:
    """A verdict is sorted distinct candidates of the key, ending with max_batch_size."""
    candidates = key.get("candidates")
    return (
        isinstance(sizes, list)
        and bool(sizes)
        and all(type(s) is int for s in sizes)
        and sizes == sorted(set(sizes))
        and isinstance(candidates, list)
        and set(sizes) <= set(candidates)
        and sizes[-1] == key.get("max_batch_size")
    )
