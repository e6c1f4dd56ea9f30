"""Service settings, read from the environment with the prefix GENSERVE_ (e.g. GENSERVE_DEVICE=cuda)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.schemas import MAX_DECODE_ITEMS

if TYPE_CHECKING:
    import torch

MB = 1024 * 1024
# zlib's level for every PNG the service writes (0-9). Level 1 against Pillow's default 6, measured
# on the shipped models' answers (python -m benchmarks.png, benchmarks/RESULTS.md): 1.1x (one 28x28
# image) to 3.5x (16 CIFAR-10 images: 1.4 vs 4.9 ms) faster to write, for 5-10% more bytes.
PNG_COMPRESSION = 1
DEVICE = re.compile(r"cpu|cuda(:\d+)?")  # what `device` accepts besides "auto"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GENSERVE_", extra="ignore")

    weights_dir: Path = Path("weights")  # every *.safetensors in it is loaded at startup
    # While serving, the weights directory is scanned this often (and at once on SIGHUP): a file
    # added, replaced or removed is loaded, warmed up and swapped in without a restart (app/service.py,
    # "New weights while serving"). 0: never scan (SIGHUP still rescans).
    reload_interval_s: float = Field(5.0, ge=0)
    # Where the verdicts of the pass size checks are kept between starts (app/checks.py): a start on
    # the same machine, code and weight files reuses them instead of checking again. None: no cache.
    check_cache_dir: Path | None = Path("~/.cache/genserve/checks")
    device: str = "auto"  # "auto" (cuda if available, else cpu), "cpu", "cuda", "cuda:N"
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    max_upload_bytes: int = Field(10 * MB, ge=1)  # per uploaded file
    # Per uploaded image, checked from its header. Decoding an RGBA PNG takes about 16 bytes per pixel
    # (measured: 65 MB at 2048x2048, 257 MB at 4096x4096), so with decode_slots = 2 the default keeps
    # decoding under ~130 MB; the models take 28-32 px, so larger images gain nothing.
    max_pixels: int = Field(2048 * 2048, ge=1)
    # Every request body that is not a multipart upload (the JSON of /decode), checked before parsing.
    # 1 MiB holds max_n = 256 latents of 32 dimensions written out in full precision several times over.
    max_json_bytes: int = Field(1 * MB, ge=1)
    decode_slots: int = Field(2, ge=1, le=64)  # uploads decoded at once (each may hold its pixels in memory)
    # Requests reading uploads at once; the others wait (their bodies stay in the network buffers).
    # Each holds at most about (decode_slots + 2) x max_upload_bytes of raw file bytes.
    upload_slots: int = Field(4, ge=1, le=256)
    max_files: int = Field(64, ge=1)  # uploaded files per request
    # An upload is read into the request's own buffer until it ends or this many bytes have come; only
    # a longer body then waits for one of the upload_slots (app/multipart.py), so a client that trickles
    # its body never holds a slot. The models' images are 28-32 px PNGs of 0.4-2.6 KB (app/static/samples),
    # so a request of up to ~25 of them never needs a slot; what this adds to memory is at most this
    # much per open connection (max_connections), beside uvicorn's own 64 KiB read buffer per connection.
    upload_preread_bytes: int = Field(64 * 1024, ge=0)
    # While a request holds an upload slot, its body must come at this many bytes/s or more, measured
    # over each upload_rate_window_s of time spent waiting for the client (the first window is the
    # grace), else 408 and the slot goes to the next request waiting. 32 KiB/s (256 kbit/s) is below a
    # slow 3G uplink; a client that slow needs over 30 s (request_timeout_s) for a 1 MB photo anyway,
    # while four attackers must now send 128 KiB/s to hold the four slots. 0: no minimum.
    min_upload_rate: int = Field(32 * 1024, ge=0)
    # Long enough to span a stall of TCP's first retransmission (1 s) without a 408.
    upload_rate_window_s: float = Field(2.0, gt=0)
    max_n: int = Field(256, ge=1, le=MAX_DECODE_ITEMS)  # images per /sample (and latents per /decode)
    # /score of a VAE: importance samples k per image, and images x k per request (each sample is a row
    # of a pass: a decode of the whole image, and a copy of it, 12 KB for 32x32 RGB)
    max_score_samples: int = Field(1000, ge=1, le=100_000)
    max_score_rows: int = Field(4096, ge=1, le=1_000_000)
    max_batch_size: int = Field(64, ge=1)  # items per forward pass; 1 disables batching
    # Opt-in: how long a pass waits for company, from its oldest request. 0 (the default) starts a
    # request at once when its model is idle; under load, what arrives during a pass forms the next.
    max_wait_ms: float = Field(0.0, ge=0)
    max_queue: int = Field(1024, ge=1)  # items waiting per batcher before requests get 503
    # A request that finds its batcher's queue full waits this long for room before its 503, so that
    # clients that resend refused requests at once (ignoring Retry-After) are held, not answered in a
    # storm that takes the CPU from the passes. Requests of several passes may fill only 3/4 of max_queue.
    queue_wait_s: float = Field(2.0, ge=0)
    # A request of at most this many items that arrives while its batcher's pass holds a larger request
    # runs in a pass of its own beside it (one such pass at a time, in a thread more), so a one-image
    # request never waits for a 64-image pass to end; 0: it joins the next pass instead. Beside a pass
    # of small requests it joins the next pass: two small passes at once only share the cores.
    express_items: int = Field(16, ge=0)
    request_timeout_s: float = Field(30.0, gt=0)  # per request, then 504
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"  # autocast dtype; applied on CUDA only
    # CUDA only: record the decoders and the priors' per-position step as CUDA graphs at start-up, one
    # per pass size (app/graphs.py), and replay them instead of launching each kernel. Off by default
    # until benchmarks/gpu/check.sh has measured it on a GPU (benchmarks/RESULTS.md). Ignored on the CPU.
    cuda_graphs: bool = False
    # Shutdown (SIGTERM, SIGINT): GET /ready turns 503 at once, the server keeps serving for
    # drain_delay_s so a load balancer can take it out of rotation, then stops accepting and gives
    # the requests in hand up to graceful_timeout_s. A container's stop grace period (compose
    # stop_grace_period, Kubernetes terminationGracePeriodSeconds) must exceed their sum.
    drain_delay_s: float = Field(5.0, ge=0)
    graceful_timeout_s: float = Field(30.0, gt=0)
    # Connections (app/protocol.py, `python -m app` only). A connection that has not sent a request's
    # complete headers within header_timeout_s of opening (or of its previous response completing) is
    # closed; trickled bytes do not extend it. Real clients send their headers in one go: from accept to
    # the end of the headers, curl, wget, httpx and urllib took 0.1-0.4 ms (median of 20 each, at most
    # 8 ms) on loopback; on a real network they follow the handshake in its first flight, and 10 s
    # still covers three lost packets in a row (TCP retransmits after 1, 2, 4 s) on the slowest link.
    # (Idle keep-alive connections close sooner: uvicorn's 5 s timeout_keep_alive.)
    header_timeout_s: float = Field(10.0, gt=0)
    # Open connections of the process; one more is answered 503 (`Connection: close`) and closed at
    # once, before it is read. None: 2048, or half of what the open file limit leaves after 256
    # descriptors when that is lower (python -m app first raises the soft limit to the hard one). A
    # proxy in front needs about one per request in flight (see the README).
    max_connections: int | None = Field(None, ge=1)
    log_format: Literal["text", "json"] = "text"  # json: one JSON object per line, with the request id
    # `python -m app`'s HTTP parser and event loop (uvicorn's http and loop): "auto" takes httptools and
    # uvloop where they are installed (uvicorn[standard], a runtime dependency), else h11 and asyncio.
    http: Literal["auto", "h11", "httptools"] = "auto"
    loop: Literal["auto", "asyncio", "uvloop"] = "auto"
    access_log: bool = True  # uvicorn's one line per request (python -m app); off saves a little under load
    torch_threads: int | None = Field(None, ge=1)  # intra-op threads of each model thread; None: cores / 2, at least 1
    # Passes that compute at once across all models (app/scheduling.py): the next turn goes to the
    # model that has had the least compute time, and a multi-step pass (a prior's draws, an
    # autoregressive decoder's pixels) offers its turn at every step, so a cheap model is not
    # queued behind heavy ones. None: cores / torch_threads on the CPU (at least 1), and no
    # scheduling on CUDA (kernels run asynchronously there); 0: no scheduling.
    compute_slots: int | None = Field(None, ge=0, le=256)
    # A pass with no steps that finds nothing else computing runs with every slot's torch threads, in the
    # one thread of the process that has that many (app/scheduling.py), at the pass sizes of at least
    # lone_pass_min_rows rows where a start-up check finds that this changes no row's bytes (with
    # pad_batches only), when expected to take at most lone_pass_max_ms (a newcomer waits for it to end).
    # On 2 cores, 2 threads ran 16-64 rows 1.1-1.8x faster than 1, and a single row 0.7-1.0x as fast.
    lone_passes: bool = True
    lone_pass_min_rows: int = Field(16, ge=1)
    lone_pass_max_ms: float = Field(25.0, ge=0)
    io_threads: int = Field(2, ge=1, le=64)  # the pool that encodes PNGs, beside the model threads (uploads: decode_slots)
    png_compression: int = Field(PNG_COMPRESSION, ge=0, le=9)  # zlib level of every answer's PNG: the pixels never change
    # Same seed, same bytes under any load. BLAS and cuDNN pick kernels by shape and different
    # kernels round differently, so a row could change in its last bit with the size of its pass.
    # True pads each pass to the smallest size that a start-up check found bit-identical to a
    # pass of max_batch_size (GET /config shows them per batcher); False runs passes unpadded.
    pad_batches: bool = True
    # With pad_batches: every Linear of a served model (models/layers.py's, in the VAEs) computes at
    # least this many rows (CPU BLAS rounds 1-3 row products differently), so small passes stay
    # batch-invariant without padding the whole pass. 1 turns it off. While max_batch_size is at least
    # this (so the Linears of a pass of max_batch_size rows are never padded), it changes nothing but
    # which pass sizes the start-up check keeps.
    linear_min_rows: int = Field(4, ge=1, le=64)

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        value = value.strip().lower()
        if value != "auto" and not DEVICE.fullmatch(value):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {value!r}")
        return value

    @field_validator("check_cache_dir", mode="before")
    @classmethod
    def _no_cache(cls, value: object) -> object:
        return None if isinstance(value, str) and value.strip().lower() in ("", "none", "off") else value

    def resolve_device(self) -> torch.device:
        """The torch device to load onto; raises RuntimeError when the requested one is missing."""
        import torch  # here, not at import: `python -m app` binds its port before torch is imported

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError(f"GENSERVE_DEVICE={self.device!r} but CUDA is not available on this machine")
            if device.index is not None and device.index >= torch.cuda.device_count():
                raise RuntimeError(
                    f"GENSERVE_DEVICE={self.device!r} but only {torch.cuda.device_count()} CUDA device(s) exist"
                )
        return device


# GENSERVE_* variables the project reads elsewhere than in the service's settings
OTHER_VARIABLES = frozenset({
    "GENSERVE_URL",  # the client's and genserve command's server (app/client.py)
    "GENSERVE_DATA_CACHE",  # training's decoded image folders (training/data.py)
    "GENSERVE_BASE", "GENSERVE_STOP_GRACE_PERIOD",  # docker-compose.yml
    "GENSERVE_BROWSER_WEIGHTS", "GENSERVE_SCREENSHOTS",  # tests/app/test_browser.py
})


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """The GENSERVE_* variables of `environ` that name no setting (a typo, or one removed, such as
    GENSERVE_MAX_INFLIGHT and GENSERVE_WORKERS): Settings ignores them, the service warns of them."""
    known = {f"GENSERVE_{name.upper()}" for name in Settings.model_fields} | OTHER_VARIABLES
    return sorted(k for k in environ if k.upper().startswith("GENSERVE_") and k.upper() not in known)


@lru_cache
def get_settings() -> Settings:
    return Settings()
