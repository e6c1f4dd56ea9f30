"""A cache of the batch-invariance checks' verdicts, so a replica that starts again is ready in seconds.

`Batcher.check_buckets` (app/batching.py) finds the pass sizes whose rows are bit-identical to a
pass of max_batch_size. Its verdict depends on nothing but what the key here records, so a verdict
found once is reused by every later start whose key is equal, and never where any part differs:

- the operation (`model:op[:prior]`) and the SHA-256 of every weight file it computes with (a
  prior's sampler decodes with its VQ-VAE: both files);
- the code that computes it: a digest of models/*.py and of the app modules that build and run
  the passes (CODE_FILES);
- the machine: torch's version, its build configuration (BLAS, oneDNN) and the switches that pick
  kernels (`torch.backends`), every environment variable that steers the kernel libraries
  (KERNEL_ENV_PREFIXES: ONEDNN_MAX_CPU_ISA and the like), the CPU (`get_cpu_capability`, its model
  name and flags from /proc/cpuinfo) or, on CUDA, the device's name, compute capability, and the
  CUDA and cuDNN versions;
- the settings that change what runs: device type, torch threads per pass, max_batch_size,
  linear_min_rows, precision, and the candidate sizes and the check's seed. (With CUDA graphs
  the eager verdict is cached, and each start checks the recorded steps against it again.)

The same cache keeps the verdicts of `Batcher.check_threads` (which pass sizes may run with every
core when alone), under the pass size check's key with `"check": "threads"`, the thread count and
the minimum rows added.

One JSON file per key, named by the key's SHA-256, holding the key itself (compared in full on
reading, so a file stored under another key is never trusted) and the verdict, which must be a
list of the key's candidate sizes ending with max_batch_size. The verdict itself is not signed: the
cache directory must be as trusted as the code (whoever can write it can make passes pad to sizes
that were never checked). A cache that cannot be read or written costs only time: the check runs
and the service serves as without it. Files are small (about 1 KB) and one is added per operation
and key, so the directory grows only with new weight files, code or machines.
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


# Environment variables that change which kernels run or how they round (oneDNN's ISA cap, MKL's code
# path, OpenMP, ATen's CPU capability, cuBLAS workspaces, TF32 overrides...): every one set is in the key.
KERNEL_ENV_PREFIXES = ("ONEDNN_", "DNNL_", "MKL_", "KMP_", "OMP_", "GOMP_", "ATEN_", "TORCH_", "PYTORCH_",
                       "CUBLAS_", "CUBLASLT_", "CUDNN_", "NVIDIA_TF32", "CUDA_VISIBLE_DEVICES")


def _backends() -> dict[str, Any]:
    """torch's switches that pick kernels or their precision."""
    return {
        "build": hashlib.sha256(torch.__config__.show().encode()).hexdigest(),  # BLAS, oneDNN, their versions
        "mkldnn": torch.backends.mkldnn.enabled,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "cudnn": [torch.backends.cudnn.enabled, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark],
        "matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
    }


def machine_key(device: torch.device) -> dict[str, Any]:
    """What the kernels a pass runs depend on, besides the code and the settings."""
    key: dict[str, Any] = {
        "torch": torch.__version__,
        "device_type": device.type,
        "backends": _backends(),
        "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(KERNEL_ENV_PREFIXES)},
    }
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
    """A verdict is sorted distinct candidates of the key, ending with max_batch_size; a thread check's
    (key "check": "threads") may be any of them, or none."""
    candidates = key.get("candidates")
    threads = key.get("check") == "threads"
    return (
        isinstance(sizes, list)
        and (bool(sizes) or threads)
        and all(type(s) is int for s in sizes)
        and sizes == sorted(set(sizes))
        and isinstance(candidates, list)
        and set(sizes) <= set(candidates)
        and (threads or sizes[-1] == key.get("max_batch_size"))
    )
