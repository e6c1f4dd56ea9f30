"""The three workloads of benchmarks/peers.py for the peer servers, through the service's own code.

A peer given the same seed or upload computes the same images and PNG bytes as the service: it
draws a /sample request's inputs with app.operations.sample_inputs, decodes uploads with
app.imaging.decode_upload, runs the model methods the service's batchers run (VAE.sample_from,
VQVAE.sample_from with the prior, VAE.reconstruct) and encodes with app.imaging.grid_png. Only the
size of a forward pass may differ, and with it, in rare pixels, the last bit (kernels round by shape).

    sample-vae_conv-16     16 images of vae_conv, one 4x4 grid
    sample-pixelcnn-1      1 image of vqvae with its pixelcnn prior (class-conditional: a random label)
    reconstruct-vae_conv   one upload through vae_conv

A request becomes input rows (`Models.inputs`); the rows of any number of requests of one workload
run as one pass (`Models.forward`); `run_batch` does that for a mixed batch, one pass per workload.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from app.imaging import decode_upload
from app.operations import sample_inputs
from benchmarks.harness import ROOT, png_bytes
from models.io import load_model

WORKLOADS = ("sample-vae_conv-16", "sample-pixelcnn-1", "reconstruct-vae_conv")
SAMPLE_N = {"sample-vae_conv-16": 16, "sample-pixelcnn-1": 1}  # images per /sample request
TEMPERATURE = 1.0  # the service's default for /sample
MAX_PIXELS = 2048 * 2048  # the service's default GENSERVE_MAX_PIXELS
WEIGHT_FILES = {"vae": "vae_conv.safetensors", "vq": "vqvae.safetensors", "prior": "vqvae_pixelcnn.safetensors"}

Inputs = tuple[torch.Tensor, ...]  # one request's input rows, every tensor with the same first dimension


@dataclass
class Models:
    vae: nn.Module  # vae_conv
    vq: nn.Module  # vqvae
    prior: nn.Module  # vqvae_pixelcnn, class-conditional
    device: torch.device

    @classmethod
    def load(cls, weights_dir: Path, device: torch.device) -> Models:
        """The same weight files the service serves, through the same loader."""
        return cls(**{key: load_model(Path(weights_dir) / name, device)[0] for key, name in WEIGHT_FILES.items()},
                   device=device)

    def inputs(self, workload: str, seed: int | None = None, upload: bytes | None = None, filename: str = "") -> Inputs:
        """One request's input rows, on the CPU: a drawn sample's, or a decoded upload (1, C, H, W)."""
        if workload == "reconstruct-vae_conv":
            if upload is None:
                raise ValueError(f"{workload} needs an upload")
            return (decode_upload(upload, filename, image_shape=tuple(self.vae.image_shape), max_pixels=MAX_PIXELS)[None],)
        if workload not in SAMPLE_N or seed is None:
            raise ValueError(f"unknown workload {workload!r} or no seed")
        if workload == "sample-vae_conv-16":
            return sample_inputs(self.vae, SAMPLE_N[workload], seed, TEMPERATURE)  # eps, uniforms, temperatures
        return sample_inputs(self.vq, SAMPLE_N[workload], seed, TEMPERATURE, self.prior)  # uniforms, temperatures, labels

    def forward(self, workload: str, *inputs: torch.Tensor) -> torch.Tensor:
        """Rows of one or more requests -> images (B, C, H, W) in [0, 1] on the CPU, as one pass."""
        inputs = tuple(t.to(self.device) for t in inputs)
        with torch.inference_mode():
            if workload == "sample-vae_conv-16":
                images = self.vae.sample_from(*inputs)
            elif workload == "sample-pixelcnn-1":
                images = self.vq.sample_from(self.prior, *inputs)
            elif workload == "reconstruct-vae_conv":
                images = self.vae.reconstruct(inputs[0])
            else:
                raise ValueError(f"unknown workload {workload!r}")
        return images.float().cpu()

    def warmup(self) -> None:
        """One pass per workload, so the first request does not pay for lazy initialisation."""
        c, h, w = self.vae.image_shape
        upload = png_bytes(Image.new("L" if c == 1 else "RGB", (w, h)))
        for workload in WORKLOADS:
            self.forward(workload, *self.inputs(workload, seed=0, upload=upload))


def run_batch(models: Models, items: list[tuple[str, Inputs]]) -> list[torch.Tensor]:
    """(workload, inputs) per request -> its images, in order; one pass per workload in the batch."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, (workload, _) in enumerate(items):
        groups[workload].append(i)
    out: list[torch.Tensor] = [None] * len(items)  # type: ignore[list-item]
    for workload, indices in groups.items():
        columns = zip(*(items[i][1] for i in indices), strict=True)  # per input tensor, every request's rows
        images = models.forward(workload, *(torch.cat(rows) for rows in columns))
        for i, part in zip(indices, torch.split(images, [int(items[i][1][0].shape[0]) for i in indices]), strict=True):
            out[i] = part
    return out


def peer_parser(doc: str, module: str) -> argparse.ArgumentParser:
    """The options every peer server takes (benchmarks.peer_plain, benchmarks.peer_litserve)."""
    p = argparse.ArgumentParser(prog=f"python -m benchmarks.{module}", description=doc.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--weights", type=Path, default=ROOT / "weights", help="the directory of the weight files")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads where the models run")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:N")
    return p


def resolve_device(name: str) -> torch.device:
    """A torch device from a GENSERVE_DEVICE-style name: "auto" is cuda when available, else cpu."""
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
