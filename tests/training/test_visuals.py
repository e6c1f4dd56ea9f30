"""The per-epoch pictures: frames, GIFs (grey and colour) and the small copies shipped in weights/samples."""

import torch
from PIL import Image

from training.visuals import grid_image, save_frame, small_gif


def test_colour_gif_frames_keep_their_colours(tmp_path):
    """Colour frames get their own palette: a few flat colours come back exactly (the web palette
    the default conversion uses would dither them)."""
    colours = torch.tensor([[0.9, 0.1, 0.2], [0.2, 0.6, 0.95], [0.5, 0.5, 0.1], [1.0, 1.0, 1.0]])
    images = colours[:, :, None, None].expand(4, 3, 8, 8)  # (4, 3, 8, 8), one flat colour each
    gif = save_frame(tmp_path, "x", 1, images)
    save_frame(tmp_path, "x", 2, images.flip(0))
    with Image.open(gif) as im:
        assert im.n_frames == 2
        im.seek(0)
        got = im.convert("RGB")
    assert got.tobytes() == grid_image(images).tobytes()


def test_small_gif_keeps_the_top_rows_of_every_frame(tmp_path):
    torch.manual_seed(0)
    for epoch in (1, 2, 3):
        save_frame(tmp_path, "samples", epoch, torch.rand(64, 3, 32, 32))
    out = small_gif(tmp_path, "samples", tmp_path / "ship" / "m__samples.gif", rows=1)
    with Image.open(out) as im:
        assert im.n_frames == 3 and im.size == (8 * 34 + 2, 34 + 2)
    with Image.open(tmp_path / "frames" / "samples_0001.png") as first:
        assert first.size == (8 * 34 + 2, 8 * 34 + 2)


def test_small_gif_keeps_evenly_spaced_epochs_with_the_first_and_the_last(tmp_path):
    """Frame k is flat grey k/10, so each GIF frame says which epoch it came from."""
    import pytest

    for epoch in range(1, 11):
        save_frame(tmp_path, "samples", epoch, torch.full((8, 1, 4, 4), epoch / 10))
    out = small_gif(tmp_path, "samples", tmp_path / "m.gif", rows=1, max_frames=4)
    kept = []
    with Image.open(out) as im:
        for i in range(im.n_frames):
            im.seek(i)
            kept.append(round(im.convert("L").getpixel((3, 3)) / 255 * 10))
    assert kept == [1, 4, 7, 10]
    assert Image.open(small_gif(tmp_path, "samples", tmp_path / "all.gif", max_frames=20)).n_frames == 10
    with pytest.raises(ValueError, match="max_frames must be at least 2"):
        small_gif(tmp_path, "samples", tmp_path / "one.gif", max_frames=1)


def test_the_card_says_when_a_shipped_gif_keeps_only_some_epochs(tmp_path):
    from models.io import ModelInfo
    from training.card import _frames_note

    for epoch in range(1, 6):
        save_frame(tmp_path, "samples", epoch, torch.full((8, 1, 4, 4), epoch / 10))
    gif = small_gif(tmp_path, "samples", tmp_path / "m__samples.gif", max_frames=3)

    def info(epochs):
        return ModelInfo(kind="vae", name="m", image_shape=(1, 4, 4), dataset="d", command="", extra={},
                         metrics={"epochs_trained": epochs})

    assert _frames_note([gif], info(5)) == "3 of its 5 epochs, evenly spaced, the first and the last among them"
    assert _frames_note([gif], info(3)) == "one frame per epoch"
