"""The one likelihood metric (training.evaluate.nll_bound) on tiny models and data made here."""

import math

import pytest
import torch

from models.vae import VAE, VAEConfig
from models.vqvae import VQVAE, VQVAEConfig
from training.data import ImageData
from training.evaluate import nll_bound


def data(n: int = 6, channels: int = 1, size: int = 28) -> ImageData:
    images = torch.randint(256, (n, channels, size, size), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    return ImageData("toy", images, torch.arange(n) % 3, 3)


def test_vae_bound_is_the_mean_iwae_bound_in_nats_and_bits_per_dim():
    torch.manual_seed(0)
    model = VAE(VAEConfig(arch="conv", latent_dim=3, channels=(4, 8), fc_dim=16, likelihood="logistic", num_mixtures=2)).eval()
    d = data()
    out = nll_bound(model, d, k=7, batch_size=4, chunk=3, seed=5)
    g = torch.Generator().manual_seed(5)
    x = d.images.float() / 255
    expected = -torch.cat([model.iwae_bound(x[:4], 7, generator=g), model.iwae_bound(x[4:], 7, generator=g)]).mean().item()
    # rel 1e-7, not 1e-9: nll_bound draws its k samples in chunks of 3, the reference in one call of 7,
    # and float32 kernels round those shapes differently (2.4e-9 apart on one x86-64 CPU, 0 on another)
    assert out["nll_nats"] == pytest.approx(expected, rel=1e-7)
    assert out["bits_per_dim"] == pytest.approx(expected / (784 * math.log(2)), rel=1e-6)


def test_vqvae_bound_adds_the_prior_and_uniform_is_log_k_per_code():
    torch.manual_seed(0)
    model = VQVAE(VQVAEConfig(in_channels=3, image_size=8, hidden_channels=8, res_channels=4, n_res_blocks=1,
                              codebook_size=16, embedding_dim=4, likelihood="logistic", num_mixtures=2)).eval()
    d = data(5, channels=3, size=8)
    x = d.images.float() / 255
    with torch.no_grad():
        rec = -model.log_likelihood(model.decode(model.quantizer.lookup(model.encode_indices(x))), x).double().mean().item()
    uniform = nll_bound(model, d)
    assert uniform["nll_nats"] == pytest.approx(rec + 4 * math.log(16), rel=1e-6)  # a 2x2 grid of 16 codes
    assert uniform["bits_per_dim"] == pytest.approx(uniform["nll_nats"] / (3 * 8 * 8 * math.log(2)), rel=1e-6)


def test_a_likelihood_that_is_not_of_8_bit_images_is_refused():
    with pytest.raises(ValueError, match="likelihood='logistic'"):
        nll_bound(VAE(VAEConfig(latent_dim=2, hidden_dims=(8, 4))), data())
    with pytest.raises(ValueError, match="likelihood='logistic'"):
        nll_bound(VQVAE(VQVAEConfig(hidden_channels=8, codebook_size=4, embedding_dim=2)), data())


def test_vqvae_bound_with_a_prior_given_the_label_and_marginalised_by_direct_sums():
    """Against sums written out with exp (no logsumexp): the conditional bound adds -log P(z | y_i),
    the marginal one -log sum_y p(y) P(z | y), and the marginal lies between the best and worst label."""
    from models.pixelcnn import PixelCNN, PixelCNNConfig

    torch.manual_seed(0)
    model = VQVAE(VQVAEConfig(image_size=8, hidden_channels=8, res_channels=4, n_res_blocks=1, codebook_size=4,
                              embedding_dim=2, likelihood="logistic", num_mixtures=2, init="uniform")).eval()
    with torch.no_grad():
        model.quantizer.embedding.copy_(torch.randn(4, 2))
    prior = PixelCNN(PixelCNNConfig(codebook_size=4, code_shape=(2, 2), num_classes=3, hidden_channels=8, n_layers=2,
                                    first_kernel_size=3)).eval()
    d = data(7, size=8)
    freqs = torch.tensor([4, 2, 1])
    x = d.images.float() / 255
    with torch.no_grad():
        codes = model.encode_indices(x)
        rec = -model.log_likelihood(model.decode(model.quantizer.lookup(codes)), x).double()  # (7,)
        per_label = torch.stack([prior.log_prob(codes, torch.full((7,), y)) for y in range(3)], 1).double()  # (7, 3)
    conditional = rec - per_label[torch.arange(7), d.labels]
    marginal = rec - (per_label.exp() * freqs.double() / 7).sum(1).log()
    out = nll_bound(model, d, prior=prior, batch_size=3)
    out_marginal = nll_bound(model, d, prior=prior, label_freqs=freqs, batch_size=3)
    assert out["nll_nats"] == pytest.approx(conditional.mean().item(), rel=1e-6)
    assert out_marginal["nll_nats"] == pytest.approx(marginal.mean().item(), rel=1e-6)
    assert ((rec - per_label.max(1).values) - 1e-9 <= marginal).all() and (marginal <= rec - per_label.min(1).values + 1e-9).all()
