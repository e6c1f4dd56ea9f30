import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence as torch_kl

from models.likelihood import DiscretizedLogisticMixture
from models.vae import VAE, VAEConfig, kl_divergence


def reconstruction_nll(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """-log p(x|z) of a Bernoulli VAE, through the model's own log_likelihood."""
    return -BERNOULLI.log_likelihood(logits, x)


def grid_images(*shape: int, seed: int = 0) -> torch.Tensor:
    """Random 8-bit images (k / 255), the data a discretized likelihood scores."""
    return torch.randint(256, shape, generator=torch.Generator().manual_seed(seed)).float() / 255


def tiny(arch: str, channels: int = 1, size: int = 28, likelihood: str = "bernoulli") -> VAE:
    torch.manual_seed(0)
    return VAE(VAEConfig(arch=arch, in_channels=channels, image_size=size, latent_dim=4,
                         hidden_dims=(32, 16), channels=(4, 8), fc_dim=16, likelihood=likelihood, num_mixtures=2))


BERNOULLI = tiny("mlp")


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


@pytest.mark.parametrize("likelihood", ["bernoulli", "logistic"])
@pytest.mark.parametrize("arch,channels,size", [("mlp", 1, 28), ("conv", 1, 28), ("conv", 3, 32), ("mlp", 3, 32)])
def test_shapes_and_loss_terms(arch, channels, size, likelihood):
    model = tiny(arch, channels, size, likelihood)
    x = grid_images(2, channels, size, size)
    params, mu, logvar = model(x)
    per_pixel = channels if likelihood == "bernoulli" else DiscretizedLogisticMixture(channels, 2).num_params
    assert params.shape == (2, per_pixel, size, size) and mu.shape == logvar.shape == (2, 4)
    g = torch.Generator().manual_seed(1)
    loss, parts = model.loss(x, g)
    torch.testing.assert_close(loss, parts["rec"] + parts["kl"])
    samples = model.sample(3)
    assert samples.shape == (3, channels, size, size) and ((samples >= 0) & (samples <= 1)).all()


def test_logistic_log_likelihood_is_the_mixture_log_prob_and_refuses_off_grid_pixels():
    model = tiny("conv", likelihood="logistic")
    x = grid_images(3, 1, 28, 28)
    params = model.decode(torch.randn(3, 4))
    expected = DiscretizedLogisticMixture(1, 2).log_prob(params, x)
    torch.testing.assert_close(model.log_likelihood(params, x), expected)
    many = model.decode(torch.randn(5, 3, 4))  # (m, B, P, H, W): m samples of z per image
    torch.testing.assert_close(model.log_likelihood(many, x), torch.stack([model.log_likelihood(p, x) for p in many]))
    with pytest.raises(ValueError, match="grid"):
        model.log_likelihood(params, (x + 0.3 / 255).clamp(max=1))


def test_factorized_images_are_the_decoders_mean():
    for likelihood in ("bernoulli", "logistic"):
        model = tiny("conv", likelihood=likelihood).eval()
        z = torch.randn(3, 4)
        params = model.decode(z)
        expected = torch.sigmoid(params) if likelihood == "bernoulli" else DiscretizedLogisticMixture(1, 2).mean(params)
        torch.testing.assert_close(model.generate(z), expected)
        x = grid_images(2, 1, 28, 28)
        torch.testing.assert_close(model.reconstruct(x), model.generate(model.encode(x)[0]))


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
    torch.testing.assert_close(a, b, rtol=0, atol=1e-9)  # the same noise, decoded in other chunks


def iwae_reference(model: VAE, x: torch.Tensor, k: int, seed: int, broken_q: bool = False) -> torch.Tensor:
    """The IWAE bound from torch.distributions, with the noise iwae_bound draws: (B,) float64."""
    from torch.distributions import Bernoulli

    mu, logvar = model.encode(x)
    std = torch.exp(0.5 * logvar)
    eps = torch.randn((k, *mu.shape), generator=torch.Generator().manual_seed(seed))  # (k, B, D)
    z = mu + eps * std
    log_px_z = Bernoulli(logits=model.decode(z).double()).log_prob(x.double().expand(k, *x.shape)).flatten(2).sum(-1)
    log_pz = Normal(0.0, 1.0).log_prob(z.double()).sum(-1)
    q = Normal(mu.double(), 1.0 if broken_q else std.double())  # broken: the -0.5 log sigma^2 term is gone
    log_qz = q.log_prob(mu.double() + eps.double() * std.double()).sum(-1)
    if broken_q:
        log_qz = log_qz - 0.5 * (eps.double() ** 2 * (std.double() ** 2 - 1)).sum(-1)  # same exponent, no log-det
    return torch.logsumexp(log_px_z + log_pz - log_qz, 0) - math.log(k)


@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_iwae_equals_torch_distributions_with_the_same_noise_and_a_broken_log_q_is_caught(arch):
    model = tiny(arch).eval()
    with torch.no_grad():
        model.fc_logvar.bias.fill_(-1.5)  # a posterior far from N(0, I), so the log-det term matters
        x = (torch.rand(4, 1, 28, 28) > 0.5).float()
        ours = model.iwae_bound(x, 50, chunk=13, generator=torch.Generator().manual_seed(3))
        reference = iwae_reference(model, x, 50, seed=3)
        broken = iwae_reference(model, x, 50, seed=3, broken_q=True)
        _, logvar = model.encode(x)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-4)
    assert logvar.sum(-1).abs().min() > 2.0  # the log-det term is far from zero here ...
    assert (ours - broken).abs().min() > 0.1  # ... so dropping it cannot pass for the bound


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


def tiny_ar(channels: int = 1, size: int = 28, layers: int = 2, kernel: int = 5, likelihood: str = "bernoulli", **kw) -> VAE:
    torch.manual_seed(0)
    return VAE(VAEConfig(arch="conv", in_channels=channels, image_size=size, latent_dim=4, channels=(4, 8),
                         fc_dim=16, decoder="autoregressive", ar_channels=6, ar_kernel=kernel, ar_layers=layers,
                         likelihood=likelihood, num_mixtures=2, **kw))


@pytest.mark.parametrize("layers,kernel", [(1, 3), (1, 7), (3, 5)])
def test_autoregressive_decoder_is_causal_at_every_pixel(layers, kernel):
    """The logits at pixel i depend on x_j for j < i in raster order and on nothing else; every
    colour channel of pixel i is predicted from earlier pixels only."""
    model = tiny_ar(channels=3, size=32, layers=layers, kernel=kernel)
    reach = model.config.ar_reach
    z = torch.randn(1, 4)
    x = torch.rand(1, 3, 32, 32, requires_grad=True)
    logits = model.decode(z, context=x)
    for r, c in [(0, 0), (0, 5), (5, 0), (7, 9), (16, 31), (31, 31)]:
        (grad,) = torch.autograd.grad(logits[0, :, r, c].sum(), x, retain_graph=True)
        seen = grad[0].abs().sum(0) > 0  # (H, W)
        rows, cols = torch.nonzero(seen, as_tuple=True)
        assert ((rows * 32 + cols) < r * 32 + c).all(), f"pixel ({r}, {c}) sees itself or a later pixel"
        assert ((r - rows) <= reach).all() and ((cols - c).abs() <= reach).all()
        if (r, c) != (0, 0):
            assert seen.any()  # and it does read its neighbourhood
    assert reach == kernel // 2 + layers - 1


AR_CASES = [(1, 28, 1, "logistic"), (1, 28, 3, "logistic"), (3, 32, 2, "logistic"), (3, 32, 1, "logistic"),
            (1, 28, 1, "bernoulli"), (3, 32, 2, "bernoulli")]
KERNEL_CASES = [(1, 28, 1, "logistic", 3), (1, 28, 1, "logistic", 7), (3, 16, 2, "logistic", 3), (1, 12, 2, "bernoulli", 7)]


@pytest.mark.parametrize("channels,size,layers,likelihood", AR_CASES)
def test_generation_draws_from_the_teacher_forced_distribution_of_what_it_drew(channels, size, layers, likelihood):
    """Every step's parameters equal those of one teacher-forced pass over the finished image (so
    likelihoods and generation are the same model), every pixel is on the model's support, and
    the draws are discrete values fed back, not means."""
    model = tiny_ar(channels, size, layers, likelihood=likelihood).double().eval()
    z = torch.randn(3, 4, dtype=torch.float64)
    steps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    order = iter(model.generation_steps())
    with torch.no_grad():
        x = model.generate(z, generator=torch.Generator().manual_seed(1),
                           on_step=lambda params: steps.append((*next(order), params)))
        forced = model.decode(z, context=x)  # (B, P, H, W)
    assert len(steps) == len(model.generation_steps()) and torch.cat([r for r, _, _ in steps]).numel() == size * size
    for rows, cols, params in steps:
        torch.testing.assert_close(params[:, :, 0], forced[:, :, rows, cols], atol=1e-10, rtol=0)
    levels = x * (1 if likelihood == "bernoulli" else 255)
    assert torch.equal(levels, levels.round()) and levels.min() >= 0 and levels.max() <= (1 if likelihood == "bernoulli" else 255)
    assert len(x.unique()) > 2 or likelihood == "bernoulli"


@pytest.mark.parametrize("channels,size,layers,likelihood,kernel", [(*case, 5) for case in AR_CASES] + KERNEL_CASES)
def test_wavefront_order_draws_the_same_pixels_as_raster_order(channels, size, layers, likelihood, kernel):
    """From the same uniforms, in float64: the wavefront order (all pixels with the same
    col + (r + 1) row at once, the context gathered at those pixels only) and the raster order
    (one pixel a step, the whole masked stack each time) give the same image."""
    model = tiny_ar(channels, size, layers, kernel=kernel, likelihood=likelihood).double().eval()
    for p in model.parameters():  # larger weights than the init, so the context matters
        p.data.mul_(3)
    z = torch.randn(4, 4, dtype=torch.float64)
    u = torch.rand(model.uniform_shape(4), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        fast = model.generate(z, uniforms=u)
        naive = model.generate(z, uniforms=u, order="raster")
    assert torch.equal(fast, naive)
    reach = model.config.ar_reach
    assert len(model.generation_steps()) == (size - 1) + (reach + 1) * (size - 1) + 1 < size * size


@pytest.mark.parametrize("layers", [1, 3])
def test_wavefront_order_never_runs_the_whole_context_stack(layers, monkeypatch):
    """The wavefront path computes each context layer at its step's pixels only: the whole stack over
    the image (what raster order runs at each of its H * W steps, and what the wavefront path ran at
    each of its steps for a deeper context before) is never called, and the same pixels come out."""
    model = tiny_ar(1, 12, layers, kernel=3).eval()
    z = torch.randn(2, 4)
    u = torch.rand(model.uniform_shape(2), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.generate(z, uniforms=u, order="raster")

        def whole_stack(_x):
            raise AssertionError("the wavefront path ran the whole context stack")

        monkeypatch.setattr(model.ar_context, "forward", whole_stack)
        assert torch.equal(model.generate(z, uniforms=u), expected)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_the_autoregressive_vae_samples_its_own_distribution(temperature):
    """A 4x4 binary AR decoder: the frequency of each of the 16 patterns of the top row among
    20,000 draws matches its exact probability (summed over the other 12 pixels by the chain rule);
    at temperature T every pixel's logit is divided by T."""
    torch.manual_seed(0)
    model = VAE(VAEConfig(arch="conv", image_size=4, latent_dim=2, channels=(2, 2), fc_dim=4,
                          decoder="autoregressive", ar_channels=3, ar_kernel=3)).eval()
    for p in model.parameters():
        p.data.mul_(4)
    n = 20_000
    z = torch.randn(1, 2).expand(n, 2)
    with torch.no_grad():
        x = model.generate(z, generator=torch.Generator().manual_seed(0), temperature=temperature)
        top = (x[:, 0, 0] * torch.tensor([1.0, 2, 4, 8])).sum(-1).long()  # (n,) the top row as a number
        counts = torch.bincount(top, minlength=16).double()
        bits = torch.arange(16)[:, None].bitwise_right_shift(torch.arange(4)).bitwise_and(1).float()  # (16, 4)
        images = torch.zeros(16, 1, 4, 4)
        images[:, 0, 0] = bits
        logits = model.decode(z[:16], context=images)[:, 0, 0] / temperature  # (16, 4): the top row reads only itself
        exact = (-F.binary_cross_entropy_with_logits(logits, bits, reduction="none").sum(-1)).double().exp()
    assert abs(exact.sum().item() - 1) < 1e-6
    chi2 = ((counts - n * exact) ** 2 / (n * exact)).sum().item()
    assert chi2 < 37.7  # the 0.999 quantile of chi-square with 15 degrees of freedom


def test_every_conditional_of_the_discretized_autoregressive_decoder_sums_to_one():
    """With the causality test above, p(x|z) = prod_i p(x_i | z, x_<i) is then normalised: the
    256 levels of a pixel, the others fixed, carry total mass 1 (RGB: 256^3 colours by the
    coupling's chain rule, checked on r with g, b fixed, which is what the mixture sums over)."""
    model = tiny_ar(1, 28, 1, likelihood="logistic").double().eval()
    z = torch.randn(1, 4, dtype=torch.float64)
    x = grid_images(1, 1, 28, 28, seed=3).double()
    for r, c in [(0, 0), (10, 13), (27, 27)]:
        images = x.expand(256, -1, -1, -1).clone()
        images[:, 0, r, c] = torch.arange(256, dtype=torch.float64) / 255
        with torch.no_grad():
            params = model.decode(z.expand(256, 4), context=images)
            per_pixel = model.pixel_likelihood.log_prob_per_pixel(params, images)[:, r, c]  # (256,)
        assert abs(torch.logsumexp(per_pixel, 0).item()) < 1e-6


def test_two_dependent_pixels_of_the_discretized_autoregressive_decoder_carry_joint_mass_one():
    """A 4x4 grey image: pixel (2, 1) reads pixel (1, 1). Over all 256^2 values of the two, the
    other 14 fixed, sum p(x_11 | x_<11) p(x_21 | x_<21) = 1: the chain rule of a normalised model."""
    torch.manual_seed(0)
    model = VAE(VAEConfig(arch="conv", image_size=4, latent_dim=2, channels=(2, 2), fc_dim=4, decoder="autoregressive",
                          ar_channels=3, ar_kernel=3, likelihood="logistic", num_mixtures=2)).double().eval()
    for p in model.parameters():
        p.data.mul_(3)
    levels = torch.arange(256, dtype=torch.float64) / 255
    images = grid_images(1, 1, 4, 4, seed=1).double().expand(256 * 256, -1, -1, -1).clone()
    images[:, 0, 1, 1] = levels.repeat_interleave(256)
    images[:, 0, 2, 1] = levels.repeat(256)
    z = torch.randn(1, 2, dtype=torch.float64).expand(len(images), 2)
    with torch.no_grad():
        params = model.decode(z, context=images)
        per_pixel = model.pixel_likelihood.log_prob_per_pixel(params, images)  # (N, 4, 4)
        forced = model.decode(z[:2], context=images[[0, 256]])  # x_11 differs: pixel (2, 1) must see it
    assert not torch.allclose(forced[0, :, 2, 1], forced[1, :, 2, 1])
    joint = per_pixel[:, 1, 1] + per_pixel[:, 2, 1]
    assert abs(torch.logsumexp(joint, 0).item()) < 1e-6


@pytest.mark.parametrize("likelihood", ["logistic", "bernoulli"])
def test_a_temperature_per_image_equals_each_image_drawn_at_its_own(likelihood):
    model = tiny_ar(3, 16, 1, likelihood=likelihood).eval()
    z = torch.randn(3, 4)
    u = torch.rand(model.uniform_shape(3), generator=torch.Generator().manual_seed(4))
    temps = [0.3, 1.0, 2.5]
    with torch.no_grad():
        together = model.generate(z, uniforms=u, temperature=torch.tensor(temps))
        alone = torch.cat([model.generate(z[i : i + 1], uniforms=u[i : i + 1], temperature=t) for i, t in enumerate(temps)])
        same = model.generate(z, uniforms=u, temperature=1.0)
    assert torch.equal(together, alone) and not torch.equal(together, same)
    with pytest.raises(ValueError, match="shape"):
        model.generate(z, uniforms=u, temperature=torch.ones(4))
    with pytest.raises(ValueError, match="uniforms must lie in"):
        model.generate(z, uniforms=u * 3)
    with pytest.raises(ValueError, match="temperature"):
        model.sample(4, temperature=torch.tensor([0.5, 1, 1, 1]))


def test_context_only_baseline_ignores_z():
    model = tiny_ar(likelihood="logistic", use_latent=False).eval()
    x = grid_images(2, 1, 28, 28)
    with torch.no_grad():
        a = model.decode(torch.randn(2, 4), context=x)
        b = model.decode(100 * torch.randn(2, 4), context=x)
    assert torch.equal(a, b)
    ar = tiny_ar(likelihood="logistic").eval()
    with torch.no_grad():
        assert not torch.equal(ar.decode(torch.randn(2, 4), context=x), ar.decode(torch.randn(2, 4), context=x))


def test_reconstruct_of_an_autoregressive_decoder_is_a_sample_with_the_fixed_seed():
    model = tiny_ar(likelihood="logistic").eval()
    x = grid_images(3, 1, 28, 28)
    with torch.no_grad():
        a, b = model.reconstruct(x), model.reconstruct(x)
        mu, _ = model.encode(x)
        seeded = torch.rand(model.uniform_shape(1), generator=torch.Generator().manual_seed(model.config.reconstruct_seed))
        expected = model.generate(mu, uniforms=seeded.expand(3, -1, -1, -1))
        other = model.generate(mu, generator=torch.Generator().manual_seed(123))
    assert torch.equal(a, b) and torch.equal(a, expected) and not torch.equal(a, other)
    with pytest.raises(ValueError, match="uniforms"):
        model.generate(mu, uniforms=torch.rand(3, 1, 28, 28))
    with pytest.raises(ValueError, match="context"):
        model.decode(mu)


def test_autoregressive_batched_equals_unbatched_and_iwae_takes_many_samples_per_image():
    model = tiny_ar().eval()
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        full = model.reconstruct(x)
        single = torch.cat([model.reconstruct(x[i : i + 1]) for i in range(4)])
        torch.testing.assert_close(full, single, atol=1e-6, rtol=0)
        z = torch.randn(5, 4, 4)  # (m, B, D): m samples per image share the image's context
        many = model.decode(z, context=x)
        one_by_one = torch.stack([model.decode(z[i], context=x) for i in range(5)])
        torch.testing.assert_close(many, one_by_one, atol=1e-6, rtol=0)
        bounds = [model.iwae_bound(x, k, chunk=50, generator=torch.Generator().manual_seed(0)).mean().item()
                  for k in (1, 100)]
    assert bounds[0] <= bounds[1]


def test_the_autoregressive_likelihood_normalises_over_binary_images():
    """On a 4x4 binary image space, p(x|z) = prod_i p(x_i | z, x_<i) sums to 1 over all 2^16 images."""
    torch.manual_seed(0)
    model = VAE(VAEConfig(arch="conv", image_size=4, latent_dim=2, channels=(2, 2), fc_dim=4,
                          decoder="autoregressive", ar_channels=3, ar_kernel=3, ar_layers=2)).eval()
    bits = torch.arange(2**16)[:, None].bitwise_right_shift(torch.arange(16)).bitwise_and(1)
    images = bits.float().reshape(-1, 1, 4, 4)
    z = torch.randn(1, 2).expand(len(images), 2)
    with torch.no_grad():
        log_p = -reconstruction_nll(model.decode(z, context=images), images).double()
    assert abs(torch.logsumexp(log_p, 0).item()) < 1e-4


def test_free_bits_changes_only_the_objective():
    model = tiny("conv")
    x = torch.rand(6, 1, 28, 28)
    plain, stats = model.loss(x, torch.Generator().manual_seed(0))
    freed, freed_stats = model.loss(x, torch.Generator().manual_seed(0), free_bits=2.0)
    for key in stats:
        torch.testing.assert_close(stats[key], freed_stats[key])  # reported: always the true -ELBO
    mu, logvar = model.encode(x)
    floor = kl_divergence(mu, logvar, reduce=False).mean(0).clamp(min=2.0).sum()
    torch.testing.assert_close(freed, stats["rec"] + floor)
    assert freed > plain  # an untrained model's KL per dimension is far below 2 nats
    with pytest.raises(ValueError, match="-1"):
        model.loss(x, free_bits=-1)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(decoder="pixel"), "pixel"),
    (dict(decoder="autoregressive"), "arch='conv'"),
    (dict(arch="conv", decoder="autoregressive", ar_kernel=4), "4"),
    (dict(arch="conv", decoder="autoregressive", ar_layers=0), "0"),
    (dict(likelihood="gaussian"), "gaussian"),
    (dict(num_mixtures=0), "0"),
])
def test_bad_decoder_config_names_the_value(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        VAEConfig(**kwargs)


@pytest.mark.parametrize("decoder", ["factorized", "autoregressive"])
def test_mean_mse_weight_adds_the_mean_images_squared_error_per_image(decoder):
    """objective(w) = objective(0) + w * (sum over subpixels of the squared error of the mixture's mean);
    the reported -ELBO is the model's, whatever w."""
    kw = dict(arch="conv", in_channels=3, image_size=8, latent_dim=4, channels=(4, 8), fc_dim=16, decoder=decoder,
              ar_channels=4, ar_kernel=3, likelihood="logistic", num_mixtures=2)
    torch.manual_seed(0)
    plain = VAE(VAEConfig(**kw))
    weighted = VAE(VAEConfig(**kw, mean_mse_weight=3.0))
    weighted.load_state_dict(plain.state_dict())
    x = torch.randint(0, 256, (2, 3, 8, 8)) / 255
    obj0, t0 = plain.loss(x, torch.Generator().manual_seed(1))
    obj1, t1 = weighted.loss(x, torch.Generator().manual_seed(1))
    params, _, _ = plain(x, torch.Generator().manual_seed(1))
    squared = F.mse_loss(plain.pixel_likelihood.mean(params, clamp=False), x)
    torch.testing.assert_close(t1["loss"], t0["loss"])
    torch.testing.assert_close(t1["mean_mse"], squared)
    torch.testing.assert_close(obj1, obj0 + 3.0 * squared * x[0].numel())


def test_mean_mse_weight_needs_the_logistic_likelihood():
    with pytest.raises(ValueError, match="mean_mse_weight applies to likelihood='logistic' only"):
        VAEConfig(mean_mse_weight=1.0)
    with pytest.raises(ValueError, match="got -2.0"):
        VAEConfig(likelihood="logistic", mean_mse_weight=-2.0)


@pytest.mark.parametrize("make", [lambda: tiny("conv"), lambda: tiny_ar(likelihood="logistic")], ids=["factorized", "ar"])
def test_what_the_service_serves_is_the_models_own_arithmetic(make):
    """sample_from(draw_noise) is sample() from the same generator; decode_latents(z) decodes with the
    fixed reconstruct draws, reconstruct(x) is decode_latents(mu); on_step sees one tensor per step."""
    model = make().eval()
    x = grid_images(3, 1, 28, 28)
    with torch.no_grad():
        for t in (1.0, 0.7):
            expected = model.sample(3, torch.Generator().manual_seed(5), temperature=t)
            eps, uniforms = model.draw_noise(3, torch.Generator().manual_seed(5))
            assert eps.shape == (3, 4) and uniforms.shape == model.uniform_shape(3)
            assert torch.equal(model.sample_from(eps, uniforms, t), expected)
            assert torch.equal(model.sample_from(eps, uniforms, torch.full((3,), t)), expected)  # one per image
        mu, _ = model.encode(x)
        assert torch.equal(model.reconstruct(x), model.decode_latents(mu))
        fixed = model.reconstruct_uniforms(3) if model.config.autoregressive else None  # the same draws for every image
        assert torch.equal(model.decode_latents(mu), model.generate(mu, uniforms=fixed))
        seen = []
        model.reconstruct(x, on_step=seen.append)
    steps = len(model.generation_steps()) if model.config.autoregressive else 0
    assert len(seen) == steps and all(s.shape[0] == 3 for s in seen)
