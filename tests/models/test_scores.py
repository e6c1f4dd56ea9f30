"""The likelihood of single images (issue 25): the per-image bounds and maps the service scores with,
and their agreement with the offline evaluation (training/evaluate.py's nll_bound)."""

import math

import pytest
import torch

from models.pixelcnn import PixelCNN, PixelCNNConfig
from models.vae import VAE, VAEConfig
from models.vqvae import VQVAE, VQVAEConfig
from training.data import ImageData
from training.evaluate import nll_bound


def grid_images(n: int, channels: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(256, (n, channels, size, size), generator=torch.Generator().manual_seed(seed)).float() / 255


def tiny_vae(autoregressive: bool = False) -> VAE:
    torch.manual_seed(0)
    return VAE(VAEConfig(arch="conv", latent_dim=3, channels=(4, 8), fc_dim=16, likelihood="logistic", num_mixtures=2,
                         decoder="autoregressive" if autoregressive else "factorized")).eval()


def tiny_vqvae() -> VQVAE:
    torch.manual_seed(0)
    return VQVAE(VQVAEConfig(in_channels=3, image_size=8, hidden_channels=8, res_channels=4, n_res_blocks=1,
                             codebook_size=16, embedding_dim=4, likelihood="logistic", num_mixtures=2)).eval()


@pytest.mark.parametrize("autoregressive", [False, True])
def test_the_iwae_bound_from_drawn_noise_is_the_bound_and_each_image_reads_only_its_own_row(autoregressive):
    model, x = tiny_vae(autoregressive), grid_images(5, 1, 28)
    eps = model.draw_score_noise(5, 9, torch.Generator().manual_seed(4))  # (n, k, D)
    assert eps.shape == (5, 9, 3)
    together = model.iwae_bound_from(x, eps, chunk=4)
    assert together.dtype == torch.float64
    assert torch.equal(together, model.iwae_bound(x, 9, chunk=4, generator=torch.Generator().manual_seed(4)))
    alone = torch.cat([model.iwae_bound_from(x[i : i + 1], eps[i : i + 1], chunk=4) for i in range(5)])
    assert torch.allclose(alone, together, rtol=1e-6, atol=0)  # batch-mates do not enter a bound
    reordered = model.iwae_bound_from(x.flip(0), eps.flip(0), chunk=4).flip(0)
    assert torch.allclose(reordered, together, rtol=1e-6, atol=0)


def test_the_vae_map_sums_to_the_decoders_term_at_the_posterior_mean():
    model, x = tiny_vae(), grid_images(3, 1, 28)
    heat = model.nll_map(x)
    assert heat.shape == (3, 28, 28) and bool((heat > 0).all())  # a pmf of a discrete pixel: each term > 0
    with torch.no_grad():
        mu, _ = model.encode(x)
        expected = -model.log_likelihood(model.decode(mu), x)
    assert torch.allclose(heat.flatten(1).sum(1), expected, rtol=1e-5)
    with pytest.raises(ValueError, match="likelihood='logistic'"):
        VAE(VAEConfig(latent_dim=2, hidden_dims=(8, 4))).nll_map(x)


def test_the_vqvae_bound_and_its_map_sum_to_the_same_nats_with_every_kind_of_prior():
    model, x = tiny_vqvae(), grid_images(4, 3, 8)
    torch.manual_seed(1)
    prior = PixelCNN(PixelCNNConfig(codebook_size=16, code_shape=(2, 2), num_classes=3, hidden_channels=8, n_layers=2,
                                    first_kernel_size=3)).eval()
    labels = torch.tensor([0, 1, 2, 1])
    freqs = torch.tensor([5.0, 3.0, 2.0])
    with torch.no_grad():
        z = model.encode_indices(x)
        rec = -model.log_likelihood(model.decode(model.quantizer.lookup(z)), x).double()
        given = prior.log_prob(z, labels).double()
        per_label = torch.stack([prior.log_prob(z, torch.full((4,), y)).double().exp() for y in range(3)], 1)  # (B, Y)
        marginal = (per_label * (freqs / freqs.sum()).double()).sum(1).log()  # written out, no logsumexp
    cases = {
        "uniform": (model.nll(x), rec + 4 * math.log(16)),
        "label given": (model.nll(x, prior, labels), rec - given),
        "marginalised": (model.nll(x, prior, label_freqs=freqs), rec - marginal),
    }
    for name, ((nats, heat), expected) in cases.items():
        assert nats.dtype == torch.float64 and heat.shape == (4, 8, 8), name
        assert torch.allclose(nats, expected, rtol=1e-6), name
        assert torch.allclose(heat.sum((1, 2)), nats, rtol=1e-6), name  # the map is the bound, split
    (_, heat), _ = cases["label given"]
    with torch.no_grad():
        per_code = torch.nn.functional.cross_entropy(prior(z, labels), z, reduction="none").double()  # (B, 2, 2)
        pixel = -model.pixel_likelihood.log_prob_per_pixel(model.decode(model.quantizer.lookup(z)), x).double()
    # the top-left code covers the top-left 4x4 patch: its share is a sixteenth of its nats per pixel
    assert torch.allclose(heat[:, :4, :4] - pixel[:, :4, :4], (per_code[:, 0, 0] / 16)[:, None, None].expand(-1, 4, 4))


def test_the_per_image_bounds_are_what_the_offline_evaluation_averages():
    model = tiny_vae()
    images = torch.randint(256, (6, 1, 28, 28), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    data = ImageData("toy", images, torch.arange(6) % 3, 3)
    x = images.float() / 255
    offline = nll_bound(model, data, k=7, batch_size=6, chunk=7, seed=5)
    per_image = -model.iwae_bound_from(x, model.draw_score_noise(6, 7, torch.Generator().manual_seed(5)), chunk=7)
    assert offline["nll_nats"] == pytest.approx(per_image.mean().item(), rel=1e-12)
    vq = tiny_vqvae()
    colour = ImageData("toy", torch.randint(256, (5, 3, 8, 8), generator=torch.Generator().manual_seed(1), dtype=torch.uint8),
                       torch.zeros(5, dtype=torch.long), 1)
    nats, _ = vq.nll(colour.images.float() / 255)
    assert nll_bound(vq, colour)["nll_nats"] == pytest.approx(nats.mean().item(), rel=1e-12)


def test_labelled_rows_are_given_their_label_and_unlabelled_ones_marginalise_over_equal_labels():
    model, x = tiny_vqvae(), grid_images(4, 3, 8)
    torch.manual_seed(1)
    prior = PixelCNN(PixelCNNConfig(codebook_size=16, code_shape=(2, 2), num_classes=3, hidden_channels=8, n_layers=2,
                                    first_kernel_size=3)).eval()
    labels = torch.tensor([2, -1, 0, -1])
    nats, heat = model.nll_labelled(prior, x, labels)
    given, given_heat = model.nll(x, prior, labels.clamp(min=0))
    free, free_heat = model.nll(x, prior, label_freqs=torch.ones(3))
    mine = labels >= 0
    assert torch.allclose(nats[mine], given[mine], rtol=1e-9) and torch.allclose(heat[mine], given_heat[mine], rtol=1e-6)
    assert torch.allclose(nats[~mine], free[~mine], rtol=1e-9) and torch.allclose(heat[~mine], free_heat[~mine], rtol=1e-6)
    assert torch.allclose(heat.sum((1, 2)), nats, rtol=1e-6)
    alone = torch.cat([model.nll_labelled(prior, x[i : i + 1], labels[i : i + 1])[0] for i in range(4)])
    assert torch.allclose(alone, nats, rtol=1e-6)  # a row does not depend on its batch-mates' labels
    unconditional = PixelCNN(PixelCNNConfig(codebook_size=16, code_shape=(2, 2), hidden_channels=8, n_layers=2,
                                            first_kernel_size=3)).eval()
    assert torch.equal(model.nll_labelled(unconditional, x, labels)[0], model.nll(x, unconditional)[0])
    assert torch.equal(model.nll_labelled(None, x, labels)[0], model.nll(x)[0])
    # on_step: the distances of the nearest codes, then each label's -log P(z_i | z_<i, y), which sum to log_p
    seen: list[torch.Tensor] = []
    stepped = model.nll_labelled(prior, x, labels, on_step=seen.append)[0]
    assert torch.equal(stepped, nats) and len(seen) == 1 + 3 and [t.shape for t in seen[1:]] == [(4, 2, 2)] * 3
    free_nats = -torch.logsumexp(torch.stack([-t.sum((1, 2)).double() for t in seen[1:]], 1) - math.log(3), 1)
    decoder_nats, _ = model._decoder_nll(x, model.quantizer.nearest(model.encode(x)))
    assert torch.allclose((decoder_nats + free_nats)[~mine], nats[~mine], rtol=1e-9)


def test_the_importance_weights_of_rows_give_the_iwae_bound_of_whole_images():
    model, x = tiny_vae(True), grid_images(3, 1, 28)
    eps = model.draw_score_noise(3, 5, torch.Generator().manual_seed(2))  # (3, 5, D)
    rows = model.log_importance_weights(x.repeat_interleave(5, 0), eps.reshape(15, -1))  # (15,)
    bound = torch.logsumexp(rows.reshape(3, 5), 1) - math.log(5)
    assert torch.allclose(bound, model.iwae_bound_from(x, eps), rtol=1e-7)
