"""The cached samplers (`sample(mode="cached")`, Ramachandran et al. 2017) against the reference
`sample(mode="naive")`: the same codes for the same uniforms, and the same logits at every position."""

import pytest
import torch

from models.pixelcnn import GatedPixelCNN, PixelCNN
from models.pixelcnnpp import PixelCNNpp

K = 8
# id -> (class, config overrides). "deep" ones have more layers (or blocks) than the grids have rows.
VARIANTS = {
    "pixelcnn": (PixelCNN, dict(n_layers=2, first_kernel_size=5, kernel_size=3)),
    "pixelcnn-deep": (PixelCNN, dict(n_layers=6, first_kernel_size=3, kernel_size=5)),
    "gated": (GatedPixelCNN, dict(n_layers=4, first_kernel_size=7, kernel_size=3)),
    "gated-deep": (GatedPixelCNN, dict(n_layers=7, first_kernel_size=3, kernel_size=5)),
    "pp-1scale": (PixelCNNpp, dict(n_layers=2, n_scales=1, dropout=0.5)),
    "pp-2scales": (PixelCNNpp, dict(n_layers=2, n_scales=2, dropout=0.5)),  # 9 gated resnets per stream
    "pp-3scales": (PixelCNNpp, dict(n_layers=1, n_scales=3, dropout=0.5)),
}
# (code_shape, num_classes, temperature): even and not square, conditional, one temperature per
# example; odd, so that the coarse scales round up (5 -> 3 -> 2), unconditional, one temperature.
GRIDS = {
    "4x6-conditional": ((4, 6), 3, torch.tensor([0.5, 1.0, 2.0, 4.0])),
    "5x5-unconditional": ((5, 5), 0, 0.8),
}


def make(variant: str, code_shape, num_classes: int = 0, dtype=torch.float32) -> torch.nn.Module:
    cls, overrides = VARIANTS[variant]
    config = cls.config_class(
        codebook_size=K, code_shape=code_shape, num_classes=num_classes, hidden_channels=8, **overrides
    )
    torch.manual_seed(0)
    return cls(config).to(dtype).eval()


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_sampler_draws_the_same_codes_as_the_naive_sampler(variant, grid):
    n, (shape, num_classes, temperature) = 4, GRIDS[grid]
    model = make(variant, shape, num_classes)
    labels = torch.tensor([2, 0, 1, 2]) if num_classes else None
    uniforms = torch.rand(n, *shape, generator=torch.Generator().manual_seed(4))
    cached = model.sample(n, labels, temperature, uniforms=uniforms)
    naive = model.sample(n, labels, temperature, uniforms=uniforms, mode="naive")
    assert cached.shape == (n, *shape) and cached.dtype == torch.long
    assert torch.equal(cached, naive)
    assert len(cached.unique()) > 1  # not a degenerate constant grid


@pytest.mark.parametrize("variant", ["pixelcnn", "gated", "pp-2scales"])
def test_all_three_samplers_agree_from_the_same_generator_seed(variant):
    model = make(variant, (4, 6), num_classes=2)
    labels, temperature = torch.tensor([1, 0, 1]), torch.tensor([0.7, 1.0, 1.5])
    codes = [
        model.sample(3, labels, temperature, generator=torch.Generator().manual_seed(9), mode=mode)
        for mode in ("cached", "cropped", "naive")
    ]
    assert torch.equal(codes[0], codes[2]) and torch.equal(codes[1], codes[2])


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_logits_equal_the_forward_logits_at_every_position(variant, grid):
    """Teacher forcing: fed the codes of a random grid one by one, the cache gives the logits that
    the full forward pass gives at every position. In float64, so a wrong window or a missed
    padding shows as an error far above rounding (1e-10) rather than as a rare flipped code."""
    n, (shape, num_classes, _) = 3, GRIDS[grid]
    h, w = shape
    model = make(variant, shape, num_classes, dtype=torch.float64)
    labels = torch.tensor([2, 0, 1]) if num_classes else None
    codes = torch.randint(0, K, (n, h, w), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = model(codes, labels)  # (n, K, h, w)
        cache = model._sampling_cache(n, labels)
        for r in range(h):
            for c in range(w):
                torch.testing.assert_close(cache.logits(r, c), expected[:, :, r, c], atol=1e-10, rtol=1e-10)
                cache.record(r, c, codes[:, r, c])


LARGER = [(PixelCNN, {}), (GatedPixelCNN, dict(n_layers=6)), (PixelCNNpp, dict(n_layers=2))]


def larger(cls, overrides, dtype) -> torch.nn.Module:
    config = cls.config_class(codebook_size=64, code_shape=(5, 5), num_classes=4, hidden_channels=32, **overrides)
    torch.manual_seed(1)
    return cls(config).to(dtype).eval()


@pytest.mark.parametrize("cls, overrides", LARGER, ids=lambda v: getattr(v, "__name__", ""))
def test_cached_sampler_is_exact_in_float64_at_a_larger_config(cls, overrides):
    """In float64 the cached computation is the naive one up to rounding far below any edge: every code is the same."""
    model = larger(cls, overrides, torch.float64)
    labels, temperature = torch.tensor([0, 1, 2, 3, 0] * 4), torch.tensor([0.5, 0.9, 1.0, 1.3, 3.0] * 4, dtype=torch.float64)
    uniforms = torch.rand(20, 5, 5, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    cached = model.sample(20, labels, temperature, uniforms=uniforms)
    naive = model.sample(20, labels, temperature, uniforms=uniforms, mode="naive")
    assert torch.equal(cached, naive)


@pytest.mark.parametrize("cls, overrides", LARGER, ids=lambda v: getattr(v, "__name__", ""))
def test_cached_sampler_in_float32_has_the_naive_logits_up_to_rounding(cls, overrides):
    """In float32 the two computations round differently (the shipped priors: at most 4.8e-6 apart),
    so a code can differ where a uniform falls within that of a cumulative-probability edge: the
    same distribution, and the same codes except at such edges (3 of 2,304 shipped grids)."""
    model = larger(cls, overrides, torch.float32)
    labels, temperature = torch.tensor([0, 1, 2, 3, 0]), torch.tensor([0.5, 0.9, 1.0, 1.3, 3.0])
    uniforms = torch.rand(5, 5, 5, generator=torch.Generator().manual_seed(6))
    seen = {"cached": [], "naive": []}
    codes = {mode: model.sample(5, labels, temperature, uniforms=uniforms, mode=mode,
                                on_logits=lambda r, c, logits, mode=mode: seen[mode].append(logits.clone()))
             for mode in seen}
    # every position's logits (so, with these seeds, every code drawn before it) agree up to rounding
    torch.testing.assert_close(torch.stack(seen["cached"]), torch.stack(seen["naive"]), rtol=0, atol=1e-4)
    assert (codes["cached"] == codes["naive"]).float().mean() >= 0.96


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("variant", ["pixelcnn", "gated", "pp-2scales"])
def test_cached_sampler_leaves_the_training_flag_as_it_was(variant, training):
    model = make(variant, (4, 6))
    model.train(training)
    uniforms = torch.rand(2, 4, 6, generator=torch.Generator().manual_seed(7))
    cached = model.sample(2, uniforms=uniforms)
    assert model.training is training
    assert all(module.training is training for module in model.modules())
    # Dropout (p = 0.5 in the PixelCNN++ variants) is off while sampling, even in training mode.
    assert torch.equal(cached, model.eval().sample(2, uniforms=uniforms))


def test_sample_runs_the_cached_mode_by_default_and_refuses_an_unknown_mode(monkeypatch):
    model = make("pixelcnn", (4, 6))
    built = []
    cache = model._sampling_cache
    monkeypatch.setattr(model, "_sampling_cache", lambda n, labels: built.append(n) or cache(n, labels))
    model.sample(2, generator=torch.Generator().manual_seed(3))
    assert built == [2]
    model.sample(2, generator=torch.Generator().manual_seed(3), mode="naive")
    assert built == [2]  # the reference mode builds no cache
    with pytest.raises(ValueError, match="mode must be one of"):
        model.sample(2, mode="fast")
