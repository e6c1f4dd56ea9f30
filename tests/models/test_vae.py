import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence as torch_kl

from models.vae import VAE, VAEConfig, kl_divergence, reconstruction_nll


def tiny(arch: str, channels: int = 1, size: int = 28) -> VAE:
    torch.manual_seed(0)
    return VAE(VAEConfig(arch=arch, in_channels=channels, image_size=size, latent_dim=4,
                         hidden_dims=(32, 16), channels=(4, 8), fc_dim=16))


def test_closed_form_kl_matches_torch_distributions_and_monte_carlo():
    torch.manual_seed(0)
    mu, logvar = torch.randn(3, 5), torch.randn(3, 5)
    ours = kl_divergence(mu, logvar)
    q, p = Normal(mu, torch.exp(0.5 * logvar)), Normal(torch.zeros(5), torch.ones(5))
    torch.testing.assert_close(ours, torch_kl(q, p).sum(-1))
    z = q.sample((200_000,))  # (S, 3, 5)
    mc = (q.log_prob(z) - p.log_prob(z)).sum(-1).mean(0)
    torch.testing.assert_close(ours, mc, atol=0.05, rtol=0.02)


def test_reconstruction_term_is_bce_from_logits_and_stable_for_large_logits():
    logits = torch.tensor([[[[50.0, -50.0]]]])
    x = torch.tensor([[[[1.0, 0.0]]]])
    nll = reconstruction_nll(logits, x)
    assert torch.isfinite(nll).all() and nll.item() < 1e-10
    x = torch.rand(2, 1, 3, 3)
    logits = torch.randn(2, 1, 3, 3)
    p = torch.sigmoid(logits)
    expected = -(x * p.log() + (1 - x) * (1 - p).log()).flatten(1).sum(1)
    torch.testing.assert_close(reconstruction_nll(logits, x), expected)


@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_gradient_flows_through_reparameterisation(arch):
    model = tiny(arch)
    x = torch.rand(4, 1, 28, 28)
    mu, logvar = model.encode(x)
    mu.retain_grad()
    logvar.retain_grad()
    z = model.reparameterize(mu, logvar)
    model.decode(z).sum().backward()
    assert mu.grad.abs().sum() > 0 and logvar.grad.abs().sum() > 0
    assert model.fc_logvar.weight.grad.abs().sum() > 0


def test_reparameterize_has_the_right_moments():
    model = tiny("mlp")
    mu = torch.full((100_000, 1), 2.0)
    logvar = torch.full((100_000, 1), math.log(0.25))
    z = model.reparameterize(mu, logvar, torch.Generator().manual_seed(0))
    assert abs(z.mean().item() - 2.0) < 0.01 and abs(z.std().item() - 0.5) < 0.01


@pytest.mark.parametrize("arch,channels,size", [("mlp", 1, 28), ("conv", 1, 28), ("conv", 3, 32), ("mlp", 3, 32)])
def test_shapes_and_loss_terms(arch, channels, size):
    model = tiny(arch, channels, size)
    x = torch.rand(2, channels, size, size)
    logits, mu, logvar = model(x)
    assert logits.shape == x.shape and mu.shape == logvar.shape == (2, 4)
    g = torch.Generator().manual_seed(1)
    loss, parts = model.loss(x, g)
    torch.testing.assert_close(loss, parts["rec"] + parts["kl"])
    assert model.sample(3).shape == (3, channels, size, size)


def test_iwae_bound_is_above_elbo_and_tightens_with_k():
    model = tiny("mlp").eval()
    x = (torch.rand(8, 1, 28, 28) > 0.5).float()
    with torch.no_grad():
        elbos = torch.stack([-model.loss(x, torch.Generator().manual_seed(s))[0] for s in range(50)])
        elbo = elbos.mean().item()
        bounds = {k: model.iwae_bound(x, k, chunk=64, generator=torch.Generator().manual_seed(0)).mean().item()
                  for k in (1, 10, 100, 1000)}
    assert bounds[1000].__class__ is float
    assert abs(bounds[1] - elbo) < 3 * elbos.std().item() + 1.0  # k = 1 is the ELBO itself
    assert bounds[1] <= bounds[10] <= bounds[100] <= bounds[1000]
    assert bounds[1000] > elbo


def test_iwae_is_float64_and_chunking_does_not_change_it():
    model = tiny("conv").eval()
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        a = model.iwae_bound(x, 60, chunk=60, generator=torch.Generator().manual_seed(0))
        b = model.iwae_bound(x, 60, chunk=7, generator=torch.Generator().manual_seed(0))
    assert a.dtype == torch.float64
    # different chunking draws different samples: equal up to Monte-Carlo noise (values are ~550 nats)
    torch.testing.assert_close(a, b, rtol=1e-3, atol=0)


def test_reconstruct_is_deterministic_and_batched_equals_unbatched():
    model = tiny("conv").eval()
    x = torch.rand(5, 1, 28, 28)
    full = model.reconstruct(x)
    single = torch.cat([model.reconstruct(x[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(full, single, atol=1e-6, rtol=0)
    assert ((full >= 0) & (full <= 1)).all()


def test_sample_temperature_and_seed():
    model = tiny("mlp").eval()
    a = model.sample(4, torch.Generator().manual_seed(3))
    b = model.sample(4, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    zero = model.sample(2, torch.Generator().manual_seed(3), temperature=0.0)
    torch.testing.assert_close(zero[0], zero[1])  # temperature 0: every sample is the decoded prior mean


@pytest.mark.parametrize("kwargs", [dict(arch="rnn"), dict(in_channels=2), dict(latent_dim=0), dict(arch="conv", image_size=30)])
def test_bad_config_names_the_value(kwargs):
    with pytest.raises(ValueError) as err:
        VAEConfig(**kwargs)
    assert str(list(kwargs.values())[-1]) in str(err.value)
