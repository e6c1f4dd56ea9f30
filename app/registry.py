"""Load every weight file of a directory onto the device, pair priors with their VQ-VAEs and
reconcile their class names (the warm-up and the batchers are app/service.py's, what each model
computes app/operations.py's, the GET /models payload app/routes/models.py's).

Served models are VAEs and VQ-VAEs, by their weight-file name. A prior (kinds pixelcnn,
gated_pixelcnn, pixelcnnpp) is served through its VQ-VAE under an API name taken from
its kind: `pixelcnn`, `gated`, `pixelcnnpp`.

`Registry.load` is also how new weights are picked up while serving (app/service.py): given the
registry served so far, a file whose bytes are unchanged (same SHA-256) reuses the model already
loaded, and a file that now fails to load keeps its last good version, listed in the problems with
the reason. Pairing then runs again over the whole directory by the rules below, so a prior whose
VQ-VAE changed is re-paired or refused as at start-up.

A file that cannot be used is skipped, not fatal: the error is logged and listed in
`Registry.problems` (GET /models/problems; a rejected prior also appears under its VQ-VAE
in GET /models). So one bad file never takes the other models down: every step of loading
and pairing runs per file, and whatever it raises rejects that file alone. Skipped are:
unreadable or invalid weight files (models/io.py lists the checks), a file whose GET /models
description would not validate (`ModelEntry`, `PriorInfo`; app/routes/models.py writes it and
says why not: it is checked here, at load, so GET /models cannot fail later), a second model
with a name already loaded, a prior whose recorded VQ-VAE is not loaded, whose recorded codebook
digest differs from that VQ-VAE's `codebook_digest()`, whose codebook_size or code_shape differ
from the VQ-VAE's, a class-conditional prior that records class names but not one per class (its
label-to-name mapping cannot be trusted; one that records none, as older files, is served without
names), or a second prior of the same kind for the same VQ-VAE.

Class names (GET /models): a model's are its own file's; a VQ-VAE whose file has none shows its
priors' when they agree. A class-conditional prior's label i is named by its own file's
class_names[i], else by its VQ-VAE file's when that records one name per class, else not at all.
Where the VQ-VAE's names disagree with a conditional prior's (other names, or another count), the
prior keeps its own and says so in `class_names_conflict` (and the log).

Which routes a served model answers is `Entry.operations` (GET /models' `operations`): a model
without a latent (models/vae.py's `has_latent`: a VAE trained with use_latent=False, whose decoder
ignores z) only samples, and a VQ-VAE samples once a prior is paired with it. How each operation is
computed lives in app/operations.py, whose `operations(entry)` lists those operations only, so the
service (app/service.py) builds batchers for them alone.

`Registry.load` logs one INFO line per weight file it reads, with the count so far and its time, and
one when it is done; it counts the files in a `LoadProgress`, which GET /ready reads (from the event
loop, while the load runs in a worker thread) to say how far start-up has got.
"""

from __future__ import annotations

import functools
import logging
import math
import reprlib
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import Any, get_args

import torch
from torch import nn

from app.checks import file_digest
from app.schemas import ApiOperation, OodThreshold
from models.io import NAME_PATTERN, ModelInfo, WeightFileError, load_model

log = logging.getLogger(__name__)

PRIOR_API_NAMES = {"pixelcnn": "pixelcnn", "gated_pixelcnn": "gated", "pixelcnnpp": "pixelcnnpp"}
SERVED_KINDS = ("vae", "vqvae")
OPERATIONS: tuple[str, ...] = get_args(ApiOperation)  # reconstruct, encode, decode, interpolate, sample
LATENT_OPERATIONS = ("reconstruct", "encode", "decode", "interpolate")  # images to z, z to images: need a latent
LATENT, PRIOR, LIKELIHOOD = "latent", "prior", "likelihood"  # what a model may lack for an operation (Entry.lacks)


class LoadProgress:
    """How far a start-up has got: files read of files to read, and since when. Registry.load counts
    in a worker thread while GET /ready reads it on the event loop: every access takes the lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._began = time.perf_counter()
        self._files: int | None = None  # None until the weights directory is listed
        self._loaded = 0

    def found(self, files: int) -> None:
        with self._lock:
            self._files, self._loaded = files, 0

    def read_one(self) -> None:
        with self._lock:
            self._loaded += 1

    def snapshot(self) -> dict[str, Any]:
        """GET /ready's fields while starting (app/schemas.py's NotReady)."""
        with self._lock:
            return {"loaded": self._loaded, "files": self._files, "elapsed_s": round(time.perf_counter() - self._began, 3)}

@dataclass
class Problem:
    file: str
    reason: str
    vqvae: str | None = None  # the VQ-VAE a rejected prior asked for


@dataclass
class LoadedFile:
    """What one weight file gave: its model, what it says, its bytes' SHA-256, when it was loaded."""

    model: nn.Module
    info: ModelInfo
    digest: str
    loaded_at: float  # time.time()


@dataclass
class Prior:
    api_name: str
    model: nn.Module
    info: ModelInfo
    class_names: tuple[str, ...] = ()  # label i's name: the file's own, or its VQ-VAE's (module docstring)
    class_names_conflict: str | None = None  # how the VQ-VAE's names disagree with this conditional prior's
    digest: str = ""  # SHA-256 of the weight file's bytes
    loaded_at: float = 0.0  # time.time() when the file was loaded

    @property
    def kind(self) -> str:
        return self.info.kind

    @property
    def num_classes(self) -> int:
        return int(self.model.config.num_classes)

    @functools.cached_property
    def ood(self) -> OodThreshold | None:
        """The out-of-distribution threshold its file stores, parsed once (`ood_threshold`)."""
        return ood_threshold(self.info)

    @property
    def bits_per_code(self) -> float | None:
        """Test NLL in bits per code, as reported (never used to choose anything)."""
        value = self.info.metrics.get("test_bits_per_code")
        return float(value) if isinstance(value, (int, float)) else None

    @property
    def selection_bits_per_code(self) -> float | None:
        """What the default prior is chosen by: the validation NLL; files trained before there was a
        validation split have only the test NLL, which is then used."""
        for key in ("val_bits_per_code", "test_bits_per_code"):
            value = self.info.metrics.get(key)
            if isinstance(value, (int, float)):
                return float(value)
        return None


@dataclass
class Entry:
    """A served model (VAE or VQ-VAE) and, for a VQ-VAE, its priors."""

    model: nn.Module
    info: ModelInfo
    device: torch.device
    priors: dict[str, Prior] = field(default_factory=dict)
    rejected: list[Problem] = field(default_factory=list)
    digest: str = ""  # SHA-256 of the weight file's bytes
    loaded_at: float = 0.0  # time.time() when the file was loaded
    batchers: dict[Any, Any] = field(default_factory=dict)  # OpKey -> Batcher, set by the Service (app/service.py)
    holders: int = 0  # requests that found this version and have not ended (Service.hold)
    warmed: Any = None  # an asyncio.Future while its first pass runs after start-up (Service._warm_or_drop)

    @functools.cached_property
    def ood(self) -> OodThreshold | None:
        """The out-of-distribution threshold its file stores (a VAE's; a VQ-VAE's are its priors'), parsed once."""
        return ood_threshold(self.info)

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def kind(self) -> str:
        return self.info.kind

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.model.image_shape)  # type: ignore[return-value]

    @property
    def class_names(self) -> tuple[str, ...]:
        """The model's own file's class names; a VQ-VAE whose file has none takes its priors' when they agree."""
        if self.info.class_names:
            return self.info.class_names
        recorded = {p.info.class_names for p in self.priors.values() if p.info.class_names}
        return recorded.pop() if len(recorded) == 1 else ()

    def lacks(self, operation: str) -> str | None:
        """What this model lacks for an API operation (OPERATIONS): LATENT (its model's `has_latent` is
        False: an image does not depend on z), PRIOR (a VQ-VAE samples through a prior and none is
        paired with it), LIKELIHOOD (scoring needs a normalised probability of 8-bit images,
        likelihood="logistic"), or None when it offers the operation."""
        if operation in LATENT_OPERATIONS and not self.model.has_latent:
            return LATENT
        if operation == "sample" and self.kind == "vqvae" and not self.priors:
            return PRIOR
        if operation == "score" and getattr(self.model.config, "likelihood", None) != "logistic":
            return LIKELIHOOD
        return None

    @property
    def operations(self) -> list[str]:
        """The API operations this model offers, in OPERATIONS' order (GET /models' `operations`)."""
        return [op for op in OPERATIONS if self.lacks(op) is None]

    @property
    def default_prior(self) -> Prior | None:
        """The prior with the lowest validation NLL (selection_bits_per_code; one without it comes last)."""
        if not self.priors:
            return None
        order = list(PRIOR_API_NAMES.values())
        return min(
            self.priors.values(),
            key=lambda p: (s if (s := p.selection_bits_per_code) is not None else math.inf, order.index(p.api_name)),
        )


class Registry:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.entries: dict[str, Entry] = {}
        self.problems: list[Problem] = []
        self.files: dict[str, LoadedFile] = {}  # file name -> what it gave (served, or refused after loading)

    @classmethod
    def load(cls, weights_dir: Path, device: torch.device, previous: Registry | None = None,
             progress: LoadProgress | None = None) -> Registry:
        """Load every *.safetensors file in weights_dir (sorted by name) onto device. With `previous`
        (the registry served so far), unchanged files reuse its models and a file that fails to load
        keeps its version from `previous` (module docstring). Each file read is counted in `progress`
        and logged (a file reused from `previous` at DEBUG only)."""
        weights_dir = Path(weights_dir)
        if not weights_dir.is_dir():
            raise FileNotFoundError(f"weights directory {str(weights_dir)!r} does not exist (set GENSERVE_WEIGHTS_DIR)")
        registry = cls(device)
        priors: list[tuple[Path, LoadedFile]] = []
        paths = sorted(weights_dir.glob("*.safetensors"))
        if progress is not None:
            progress.found(len(paths))
        begin = time.perf_counter()
        read = 0
        for i, path in enumerate(paths, 1):
            kept = previous.files.get(path.name) if previous is not None else None
            start = time.perf_counter()
            try:
                loaded = registry._read(path, kept)
            except Exception as err:  # WeightFileError, or anything a foreign file provokes
                if progress is not None:
                    progress.read_one()
                if kept is None:
                    registry.reject(path, f"cannot load: {err}")
                    continue
                registry.reject(path, f"cannot load: {err}; the version loaded at {iso_time(kept.loaded_at)} "
                                      f"(sha256 {kept.digest}) is still served")
                loaded = kept
            else:
                if progress is not None:
                    progress.read_one()
                reused = loaded is kept
                read += not reused
                log.log(logging.DEBUG if reused else logging.INFO, "%s %d/%d files (%s, %s %r) in %.2f s",
                        "kept" if reused else "loaded", i, len(paths), path.name, loaded.info.kind, loaded.info.name,
                        time.perf_counter() - start)
            registry.files[path.name] = loaded
            registry._isolated(path, registry._add, path, loaded, priors)
        for path, loaded in priors:
            registry._isolated(path, registry._attach_prior, path, loaded)
        for entry in list(registry.entries.values()):  # each part was checked alone; now the whole item
            registry._isolated(Path(entry.info.path or entry.name), registry._check_description, entry)
        if not registry.entries:
            log.warning("no servable model in %s", weights_dir)
        log.info("weights directory %s: %d file(s), %d read, %d model(s) and %d prior(s) served, %d refused, in %.2f s",
                 weights_dir, len(paths), read, len(registry.entries),
                 sum(len(e.priors) for e in registry.entries.values()), len(registry.problems), time.perf_counter() - begin)
        return registry

    def _isolated(self, path: Path, step: Any, *args: Any) -> None:
        """Run one file's loading or pairing step; anything it raises rejects that file, never the others."""
        try:
            step(*args)
        except Exception as err:  # a bug or a file nobody foresaw: this file is skipped, the service starts
            log.exception("unexpected error on weight file %s", path)
            self.reject(path, f"cannot be used: {type(err).__name__}: {_clip(err)}")

    def _read(self, path: Path, kept: LoadedFile | None, tries: int = 3) -> LoadedFile:
        """Load one file, or reuse `kept` (its earlier load) when the file's bytes are the same. The
        file is hashed, then loaded: when it changed in between (a rename or a write: its stat
        differs before and after), both are done again, so a digest always names the bytes loaded."""
        for _ in range(tries):
            before = _stat(path)
            digest = file_digest(path)
            if kept is not None and kept.digest == digest:
                loaded = kept
            else:
                model, info = load_model(path, self.device)
                loaded = LoadedFile(model, info, digest, time.time())
            if _stat(path) == before:
                return loaded
        raise WeightFileError(f"{path}: it kept changing while being read ({tries} tries); it is read again at the next scan")

    def drop_stale_problems(self) -> None:
        """Forget the refusals of files that are served after all (a reload that kept the version
        served before, priors included), except those saying so ("still served")."""
        served = {Path(f).name for e in self.entries.values() for f in
                  [e.info.path, *(p.info.path for p in e.priors.values())] if f}
        self.problems = [p for p in self.problems if p.file not in served or "still served" in p.reason]

    def _add(self, path: Path, loaded: LoadedFile, priors: list[tuple[Path, LoadedFile]]) -> None:
        """A loaded file: a prior waits for pairing, a VAE or VQ-VAE is served once its description validates."""
        model, info = loaded.model, loaded.info
        if info.kind in PRIOR_API_NAMES:
            priors.append((path, loaded))
        elif info.kind not in SERVED_KINDS:
            self.reject(path, f"kind {info.kind!r} is not served")
        elif info.name in self.entries:
            self.reject(path, f"a model named {info.name!r} is already loaded from {self.entries[info.name].info.path}")
        else:
            entry = Entry(model, info, device=self.device, digest=loaded.digest, loaded_at=loaded.loaded_at)
            invalid = _payload().invalid_model_item(entry)
            if invalid:
                return self.reject(path, f"its GET /models description is invalid: {invalid}")
            self.entries[info.name] = entry

    def _check_description(self, entry: Entry) -> None:
        """Withdraw a served model (and its priors) whose whole GET /models item, priors included, would not validate."""
        invalid = _payload().invalid_model_item(entry)
        if invalid:
            del self.entries[entry.name]
            path = Path(entry.info.path or entry.name)
            self.reject(path, f"its GET /models description is invalid: {invalid}")
            for prior in entry.priors.values():
                self.reject(Path(prior.info.path or prior.info.name), f"its VQ-VAE {entry.name!r} was refused")

    def reject(self, path: Path, reason: str, vqvae: str | None = None) -> None:
        log.error("skipping weight file %s: %s", path, reason)
        problem = Problem(path.name, reason, vqvae)
        self.problems.append(problem)
        if vqvae in self.entries:
            self.entries[vqvae].rejected.append(problem)

    def _attach_prior(self, path: Path, loaded: LoadedFile) -> None:
        model, info = loaded.model, loaded.info
        api_name = PRIOR_API_NAMES[info.kind]
        vq_name = info.extra.get("vqvae") if isinstance(info.extra, dict) else None
        if vq_name is None or vq_name == "":
            return self.reject(path, "the prior does not record its VQ-VAE (extra.vqvae)")
        if not isinstance(vq_name, str) or not NAME_PATTERN.fullmatch(vq_name):
            return self.reject(path, f"extra.vqvae {reprlib.repr(vq_name)} is not a model name")
        entry = self.entries.get(vq_name)
        if entry is None:
            return self.reject(path, f"its VQ-VAE {vq_name!r} is not loaded", vq_name)
        if entry.kind != "vqvae":
            return self.reject(path, f"it names {vq_name!r} as its VQ-VAE, but that model is a {entry.kind}")
        vq = entry.model
        digest = vq.codebook_digest()
        if info.extra.get("codebook_sha256") != digest:
            return self.reject(
                path,
                f"codebook digest {_clip(repr(info.extra.get('codebook_sha256')), 100)} differs from VQ-VAE {vq_name!r}'s {digest!r}: "
                "the prior was trained on another codebook",
                vq_name,
            )
        cfg = model.config
        if cfg.codebook_size != vq.config.codebook_size:
            return self.reject(
                path, f"codebook_size {cfg.codebook_size} differs from VQ-VAE {vq_name!r}'s {vq.config.codebook_size}", vq_name
            )
        if tuple(cfg.code_shape) != tuple(vq.code_shape):
            return self.reject(
                path, f"code_shape {tuple(cfg.code_shape)} differs from VQ-VAE {vq_name!r}'s {tuple(vq.code_shape)}", vq_name
            )
        names = info.class_names
        if cfg.num_classes and names and len(names) != cfg.num_classes:
            return self.reject(path, f"it records {len(names)} class names for its {cfg.num_classes} classes", vq_name)
        if api_name in entry.priors:
            other = entry.priors[api_name].info.path
            return self.reject(path, f"a {info.kind} prior for {vq_name!r} is already loaded from {other}", vq_name)
        names, conflict = _prior_class_names(info, cfg.num_classes, entry.info)
        prior = Prior(api_name, model, info, names, conflict, digest=loaded.digest, loaded_at=loaded.loaded_at)
        invalid = _payload().invalid_prior_item(prior)
        if invalid:
            return self.reject(path, f"its GET /models description is invalid: {invalid}", vq_name)
        if conflict:
            log.warning("prior %s (%s) of %s: %s", info.name, path.name, vq_name, conflict)
        entry.priors[api_name] = prior
        log.info("prior %s (%s) attached to %s as %r", info.name, path.name, vq_name, api_name)

    def get(self, name: str) -> Entry | None:
        return self.entries.get(name)

    def prior_owner(self, name: str) -> str | None:
        """The VQ-VAE serving a prior whose weight-file name is `name`, for a helpful 404."""
        for entry in self.entries.values():
            for prior in entry.priors.values():
                if prior.info.name == name:
                    return entry.name
        return None

    def describe(self) -> list[dict[str, Any]]:
        """The GET /models payload (app/routes/models.py writes it)."""
        return _payload().describe(self)


def _payload() -> ModuleType:
    """app/routes/models.py, which writes the GET /models payload and says why an item would not
    validate. Imported when first needed: it imports the service, which imports this module."""
    from app.routes import models

    return models


def signature(entry: Entry) -> tuple[str, tuple[tuple[str, str], ...]]:
    """What a served model computes with: its file's bytes and its priors' (a reload keeps an entry
    whose signature is unchanged, batchers and all)."""
    return entry.digest, tuple(sorted((p.api_name, p.digest) for p in entry.priors.values()))


def scan(weights_dir: Path) -> dict[str, tuple[int, ...]]:
    """Every *.safetensors file in weights_dir: name -> its stat (`_stat`). A directory that has gone
    scans as empty, and Registry.load then fails: the models served keep serving."""
    found = {}
    for path in Path(weights_dir).glob("*.safetensors"):
        try:
            found[path.name] = _stat(path)
        except OSError:  # removed while scanning
            continue
    return found


def _stat(path: Path) -> tuple[int, ...]:
    """What changes when a file is written, replaced or renamed over: size, modification and change
    times, inode and device (a copy that keeps the size and restores the mtime still changes ctime)."""
    st = path.stat()
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev


def ood_threshold(info: ModelInfo) -> OodThreshold | None:
    """The out-of-distribution threshold a weight file stores (`python -m training threshold`), or None
    when it has none or one that does not parse (logged: the file still serves, without a verdict)."""
    stored = info.extra.get("ood")
    if stored is None:
        return None
    try:
        return OodThreshold.model_validate(stored)
    except ValueError as err:
        log.warning("%s: its extra['ood'] is not a threshold (%s); /score gives no verdict for it", info.path, _clip(err))
        return None


def iso_time(seconds: float) -> str:
    """time.time() as ISO 8601 in UTC, to the millisecond (GET /models' loaded_at)."""
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _clip(err: object, limit: int = 300) -> str:
    """A reason built from a file's content, cut to `limit` characters."""
    text = str(err)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _prior_class_names(info: ModelInfo, num_classes: int, vq_info: ModelInfo) -> tuple[tuple[str, ...], str | None]:
    """(label names, conflict) of a prior whose VQ-VAE's file is `vq_info`; see the module docstring."""
    own, of_vq = info.class_names, vq_info.class_names
    if not num_classes or not of_vq or own == of_vq:
        return own, None
    if own:
        return own, (f"its VQ-VAE {vq_info.name!r} records other class names ({reprlib.repr(list(of_vq))}); "
                     "this prior's labels are named by its own")
    if len(of_vq) == num_classes:
        return of_vq, None
    return (), (f"its VQ-VAE {vq_info.name!r} records {len(of_vq)} class names for this prior's {num_classes} classes; "
                "its labels have no names")
