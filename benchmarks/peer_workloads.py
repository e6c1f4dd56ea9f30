"""The three workloads of benchmarks/peers.py as plain torch, for the peer servers.

Each step is the service's own (app/routes/generate.py, app/registry.py, app/dependencies.py),
so a peer given the same seed or upload computes the same images and PNG bytes; only the size
of a forward pass may differ, and with it, in rare pixels, the last bit (kernels round by shape).

    sample-vae_conv-16     z = randn(16, D) * temperature from Generator().manual_seed(seed);
                           vae_conv.sample(16, z=z); one 4x4 grid
    sample-pixelcnn-1      uniforms = rand(1, h, w), then labels = randint(num_classes, (1,)) from
                           the same generator; codes = vqvae_pixelcnn.sample(...); vqvae.decode_indices
    reconstruct-vae_conv   decode_upload(png) -> (1, C, H, W); vae_conv.reconstruct; one image

A request becomes input rows (`Models.inputs`), the rows of any number of requests of one
workload run as one pass (`Models.forward`), and `run_batch` does that for a mixed batch:
grouped by workload, one pass per group, each request's own rows back in order.
"""

from __future__ import annotations

import io
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from app.imaging import decode_upload
from models.io import load_model

WORKLOADS = ("sample-vae_conv-16", "sample-pixelcnn-1", "reconstruct-vae_conv")
SAMPLE_N = {"sample-vae_conv-16": 16, "sample-pixelcnn-1": 1}  # images per /sample request
TEMPERATURE = 1.0  # the service's default for /sample
MAX_PIXELS = 4096 * 4096  # the service's default GENSERVE_MAX_PIXELS
WEIGHT_FILES = {"vae": "vae_conv.safetensors", "vq": "vqvae.safetensors", "prior": "vqvae_pixelcnn.safetensors"}

Inputs = tuple[torch.Tensor, ...]  # one request's input rows, every tensor with the same first dimension


def resolve_device(name: str) -> torch.device:
    """A torch device from a GENSERVE_DEVICE-style name: "auto" is cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class Models:
    vae: nn.Module  # vae_conv
    vq: nn.Module  # vqvae
    prior: nn.Module  # vqvae_pixelcnn, class-conditional
    device: torch.device

    @classmethod
    def load(cls, weights_dir: Path, device: torch.device) -> Models:
        """The same weight files the service serves, through the same loader."""
        loaded = {key: load_model(Path(weights_dir) / name, device)[0] for key, name in WEIGHT_FILES.items()}
        return cls(**loaded, device=device)

    def inputs(self, workload: str, seed: int | None = None, upload: bytes | None = None, filename: str = "") -> Inputs:
        """One request's input rows, on the CPU, drawn or decoded exactly as the service's route does."""
        if workload == "reconstruct-vae_conv":
            if upload is None:
                raise ValueError(f"{workload} needs an upload")
            x = decode_upload(upload, filename, image_shape=tuple(self.vae.image_shape), max_pixels=MAX_PIXELS)
            return (x.unsqueeze(0),)  # (1, C, H, W)
        if workload not in SAMPLE_N or seed is None:
            raise ValueError(f"unknown workload {workload!r} or no seed")
        n = SAMPLE_N[workload]
        generator = torch.Generator().manual_seed(seed)
        if workload == "sample-vae_conv-16":
            return (torch.randn(n, self.vae.config.latent_dim, generator=generator) * TEMPERATURE,)  # (n, D)
        h, w = self.prior.config.code_shape
        uniforms = torch.rand(n, h, w, generator=generator)  # (n, h, w), drawn before the labels
        labels = torch.randint(int(self.prior.config.num_classes), (n,), generator=generator)  # (n,)
        return uniforms, torch.full((n,), TEMPERATURE), labels

    def forward(self, workload: str, *inputs: torch.Tensor) -> torch.Tensor:
        """Rows of one or more requests -> images (B, C, H, W) in [0, 1] on the CPU, as one pass."""
        inputs = tuple(t.to(self.device) for t in inputs)
        with torch.inference_mode():
            if workload == "sample-vae_conv-16":
                (z,) = inputs
                images = self.vae.sample(z.shape[0], z=z)
            elif workload == "sample-pixelcnn-1":
                uniforms, temperature, labels = inputs
                codes = self.prior.sample(
                    uniforms.shape[0], labels=labels, temperature=temperature.float(), uniforms=uniforms.float()
                )  # (B, h, w)
                images = self.vq.decode_indices(codes)
            elif workload == "reconstruct-vae_conv":
                (x,) = inputs
                images = self.vae.reconstruct(x)
            else:
                raise ValueError(f"unknown workload {workload!r}")
        return images.float().cpu()

    def warmup(self) -> None:
        """One pass per workload, so the first request does not pay for lazy initialisation."""
        upload = blank_png(tuple(self.vae.image_shape))
        for workload in WORKLOADS:
            self.forward(workload, *self.inputs(workload, seed=0, upload=upload))


def run_batch(models: Models, items: list[tuple[str, Inputs]]) -> list[torch.Tensor]:
    """(workload, inputs) per request -> its images, in order; one pass per workload in the batch."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, (workload, _) in enumerate(items):
        groups[workload].append(i)
    out: list[torch.Tensor | None] = [None] * len(items)
    for workload, indices in groups.items():
        columns = zip(*(items[i][1] for i in indices), strict=True)  # per input tensor, every request's rows
        images = models.forward(workload, *(torch.cat(rows) for rows in columns))
        sizes = [int(items[i][1][0].shape[0]) for i in indices]
        for i, part in zip(indices, torch.split(images, sizes), strict=True):
            out[i] = part
    return out  # type: ignore[return-value]


def blank_png(image_shape: tuple[int, ...]) -> bytes:
    """A black image of the model's size, as PNG bytes (for warm-up)."""
    c, h, w = image_shape
    buffer = io.BytesIO()
    Image.new("L" if c == 1 else "RGB", (w, h)).save(buffer, format="PNG")
    return buffer.getvalue()
