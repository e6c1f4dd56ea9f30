"""The seed article's pictures: one PNG frame per epoch, gathered into an animated GIF."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image
from torchvision.utils import make_grid


def grid_image(images: torch.Tensor, nrow: int | None = None, padding: int = 2) -> Image.Image:
    """(N, C, H, W) in [0, 1] -> a PIL image of a grid with ceil(sqrt(N)) images per row."""
    nrow = nrow or math.ceil(math.sqrt(images.shape[0]))
    grid = make_grid(images.detach().float().cpu().clamp(0, 1), nrow=nrow, padding=padding)  # (3, H', W')
    array = grid.mul(255).round().byte().permute(1, 2, 0).numpy()  # (H', W', 3)
    return Image.fromarray(array[..., 0] if images.shape[1] == 1 else array)


def _palette(image: Image.Image) -> Image.Image:
    """A GIF frame: grey stays grey; colour gets its own 256-colour median-cut palette (the default
    web palette would band and dither colour images badly)."""
    if image.mode == "L":
        return image.convert("P")
    return image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)


def save_frame(run_dir: str | Path, name: str, epoch: int, images: torch.Tensor, duration_ms: int = 400) -> Path:
    """Write frames/<name>_<epoch>.png and rebuild <name>.gif from every frame so far (resume-safe)."""
    run_dir = Path(run_dir)
    frames_dir = run_dir / "frames"
    frames_dir.mkdir(parents=True, exist_ok=True)
    grid_image(images).save(frames_dir / f"{name}_{epoch:04d}.png")
    frames = [_palette(Image.open(p)) for p in sorted(frames_dir.glob(f"{name}_*.png"))]
    return _write_gif(frames, run_dir / f"{name}.gif", duration_ms)


def _write_gif(frames: list[Image.Image], out: Path, duration_ms: int) -> Path:
    frames[0].save(out, save_all=True, append_images=frames[1:], duration=duration_ms, loop=0)
    return out


def small_gif(
    run_dir: str | Path, name: str, out: str | Path, rows: int = 1, per_row: int = 8, duration_ms: int = 400,
    max_frames: int | None = None,
) -> Path:
    """A shipped copy of a run's <name> GIF: the top `rows` rows of every frame of frames/<name>_*.png
    (grid_image grids, `per_row` cells a row with 2-pixel padding), so the first images of the fixed grid.
    `max_frames` keeps that many epochs, evenly spaced, the first and the last always among them."""
    frames_dir = Path(run_dir) / "frames"
    paths = sorted(frames_dir.glob(f"{name}_*.png"))
    if not paths:
        raise FileNotFoundError(f"no frames {frames_dir}/{name}_*.png")
    if max_frames is not None and len(paths) > max_frames:
        if max_frames < 2:
            raise ValueError(f"max_frames must be at least 2 (the first and the last epoch), got {max_frames}")
        step = (len(paths) - 1) / (max_frames - 1)
        paths = [paths[round(i * step)] for i in range(max_frames)]
    frames = []
    for p in paths:
        with Image.open(p) as frame:
            cell = (frame.width - 2) // per_row  # a cell and its padding
            frames.append(_palette(frame.crop((0, 0, frame.width, rows * cell + 2))))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return _write_gif(frames, out, duration_ms)
