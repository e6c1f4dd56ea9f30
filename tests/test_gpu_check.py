"""benchmarks/gpu/service.py's comparison of two services' answers (the GPU check, step 2)."""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def load_service_module():
    spec = importlib.util.spec_from_file_location("gpu_service", ROOT / "benchmarks/gpu/service.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array.astype(np.uint8)).save(out, format="PNG")
    return out.getvalue()


def test_image_difference_counts_pixels_image_by_image():
    service = load_service_module()
    a = [png(np.zeros((4, 4))), png(np.full((4, 4), 9))]
    changed = np.full((4, 4), 9)
    changed[0, 0] = 12
    b = [png(np.zeros((4, 4))), png(changed)]
    assert service.image_difference(a, b) == "3.12% of pixel values differ, largest by 3/255"
    assert service.image_difference(a, a) == "0.00% of pixel values differ, largest by 0/255"
    assert service.image_difference(a, b[:1]) == "2 images vs 1"
    assert service.image_difference(a, [png(np.zeros((4, 4))), png(np.zeros((5, 4)))]) == "images of different sizes"
