"""VQ-VAE: quantiser invariants, codebook maintenance (init, EMA, restarts), shapes, save/load."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from models.vqvae import VQVAE, VectorQuantizer, VQVAEConfig

TINY = VQVAEConfig(hidden_channels=16, res_channels=8, n_res_blocks=1, codebook_size=16, embedding_dim=4)


def quantizer(**overrides) -> VectorQuantizer:
    """A bare quantiser with a known codebook: no data init, no restarts unless asked."""
    cfg = dataclasses.replace(TINY, **{"init": "uniform", "dead_code_steps": 0, **overrides})
    return VectorQuantizer(cfg)


def set_codebook(q: VectorQuantizer, codebook: torch.Tensor) -> None:
    with torch.no_grad():
        q.embedding.copy_(codebook)
        if q.config.ema:
            q.cluster_size.fill_(1.0)
            q.embed_avg.copy_(codebook)


def to_grid(flat: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B*h*w, D) rows in (B, h, w) order -> z_e (B, D, h, w), the inverse of the quantiser's flatten."""
    d = flat.shape[1]
    return flat.view(-1, h, w, d).permute(0, 3, 1, 2)  # (B, D, h, w)


def flatten(z: torch.Tensor) -> torch.Tensor:
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # (B*h*w, D)


def rows_in(rows: torch.Tensor, table: torch.Tensor) -> bool:
    """Whether every row of `rows` (M, D) is exactly some row of `table` (N, D)."""
    return bool((rows.detach()[:, None, :] == table[None, :, :]).all(-1).any(1).all())


@pytest.mark.parametrize(
    "field, value",
    [
        ("in_channels", 2),
        ("image_size", 30),
        ("hidden_channels", 15),
        ("codebook_size", 0),
        ("beta", -0.1),
        ("ema_decay", 1.0),
        ("ema_epsilon", 0.0),
        ("init", "kmeans++"),
        ("kmeans_iters", 0),
        ("dead_code_steps", -1),
    ],
)
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        VQVAEConfig(**{field: value})


@pytest.mark.parametrize("channels, size, codes", [(1, 28, 7), (3, 32, 8)])
def test_shapes(channels, size, codes):
    torch.manual_seed(0)
    model = VQVAE(dataclasses.replace(TINY, in_channels=channels, image_size=size)).eval()
    assert model.image_shape == (channels, size, size)
    assert model.code_shape == (codes, codes)
    assert model.latent_shape == (4, codes, codes)
    x = torch.rand(2, channels, size, size)
    z_e = model.encode(x)
    assert z_e.shape == (2, 4, codes, codes)
    x_hat, indices, vq_loss = model(x)
    assert x_hat.shape == x.shape and vq_loss.shape == ()
    assert indices.shape == (2, codes, codes) and indices.dtype == torch.long
    assert torch.equal(model.encode_indices(x), indices)
    images = model.decode_indices(indices)
    assert images.shape == x.shape and images.min() >= 0 and images.max() <= 1
    torch.testing.assert_close(model.reconstruct(x), x_hat.clamp(0, 1))


def test_z_q_is_the_nearest_codebook_row():
    torch.manual_seed(0)
    q = quantizer().eval()
    set_codebook(q, torch.randn(16, 4))
    z_e = torch.randn(3, 4, 5, 5)
    z_q, indices, _ = q(z_e)
    # z_q holds exactly the codebook rows of its indices (up to the z_e + (z_q - z_e) rounding).
    torch.testing.assert_close(z_q, q.lookup(indices), rtol=0, atol=1e-6)
    assert torch.equal(q.nearest(z_e), indices)
    # Each index is the argmin of the squared distance, checked against brute-force cdist.
    d2 = torch.cdist(flatten(z_e).double(), q.embedding.double()).square()  # (75, 16)
    chosen = d2.gather(1, indices.reshape(-1, 1)).squeeze(1)
    torch.testing.assert_close(chosen, d2.min(1).values, rtol=0, atol=1e-5)
    assert torch.equal(indices.flatten(), d2.argmin(1))


def test_straight_through_gradient():
    torch.manual_seed(0)
    model = VQVAE(TINY).eval()
    z_e = model.encode(torch.rand(2, 1, 28, 28))
    z_q, _, _ = model.quantize(z_e)
    model.decode(z_q).square().mean().backward()  # no vq loss: only the straight-through path
    for name, p in model.encoder.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name

    # d(z_q)/d(z_e) is the identity: the gradient of sum(z_q * w) is w itself.
    q = quantizer().eval()
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    w = torch.randn(2, 4, 3, 3)
    z_q, _, _ = q(z)
    (z_q * w).sum().backward()
    assert torch.equal(z.grad, w)


def test_commitment_loss_in_ema_mode():
    torch.manual_seed(0)
    q = quantizer(beta=0.25)
    set_codebook(q, torch.randn(16, 4))
    z_e = torch.randn(2, 4, 3, 3)
    for mode in (q.eval, q.train):
        codebook = q.embedding.clone()  # a training forward moves the codebook after using it
        mode()
        _, indices, loss = q(z_e)
        e = F.embedding(indices, codebook).permute(0, 3, 1, 2)  # (B, D, h, w)
        torch.testing.assert_close(loss, 0.25 * F.mse_loss(z_e, e))
    assert isinstance(q.embedding, torch.Tensor) and not isinstance(q.embedding, torch.nn.Parameter)


def test_codebook_loss_trains_codebook_without_ema():
    torch.manual_seed(0)
    q = quantizer(ema=False, beta=0.25).eval()
    set_codebook(q, torch.randn(16, 4))
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    _, indices, loss = q(z)
    e = q.lookup(indices).detach()
    torch.testing.assert_close(loss, 1.25 * F.mse_loss(z, e))
    loss.backward()
    # Codebook loss ||sg[z_e] - e||^2 (eq. 3): d/de_k = 2 * sum_{j -> k} (e_k - z_j) / numel.
    flat, idx = flatten(z.detach()), indices.flatten()
    counts = torch.bincount(idx, minlength=16).float()
    sums = torch.zeros(16, 4).index_add_(0, idx, flat)
    expected = 2 * (counts[:, None] * q.embedding.detach() - sums) / z.numel()
    torch.testing.assert_close(q.embedding.grad, expected)
    assert q.embedding.grad[counts == 0].abs().sum() == 0
    # Commitment term beta * ||z_e - sg[e]||^2 is all the encoder side gets.
    torch.testing.assert_close(z.grad, 2 * 0.25 * (z.detach() - e) / z.numel())


def test_ema_moves_codes_towards_their_inputs():
    torch.manual_seed(0)
    q = quantizer(ema_decay=0.9, ema_epsilon=1e-5).train()
    before = torch.randn(16, 4)
    set_codebook(q, before)
    z = torch.randn(4, 4, 3, 3)
    _, indices, _ = q(z)
    flat, idx = flatten(z), indices.flatten()
    counts = torch.bincount(idx, minlength=16).float()
    sums = torch.zeros(16, 4).index_add_(0, idx, flat)
    used = counts > 0
    means = sums[used] / counts[used, None]
    assert (q.embedding[used] - means).norm(dim=1).lt((before[used] - means).norm(dim=1)).all()
    # Appendix A.1 updates, with Laplace-smoothed cluster sizes.
    n_i = 0.9 * 1.0 + 0.1 * counts
    m_i = 0.9 * before + 0.1 * sums
    smoothed = (n_i + 1e-5) / (n_i.sum() + 16 * 1e-5) * n_i.sum()
    torch.testing.assert_close(q.cluster_size, n_i)
    torch.testing.assert_close(q.embedding, m_i / smoothed[:, None])


@pytest.mark.parametrize("ema", [True, False])
def test_dead_code_is_restarted(ema):
    torch.manual_seed(0)
    q = quantizer(codebook_size=4, embedding_dim=2, dead_code_steps=3, ema=ema).train()
    live = torch.tensor([[-1.0, -1.0], [1.0, 1.0], [1.0, -1.0]])
    set_codebook(q, torch.cat([live, torch.full((1, 2), 100.0)]))
    for step in range(1, 4):
        flat = live.repeat(10, 1) + 0.1 * torch.randn(30, 2)  # every live code is used, code 3 never
        q(to_grid(flat, 5, 6))
        if step < 3:
            assert q.embedding[3].norm() > 50 and int(q.steps_unused[3]) == step
            assert int(q.restarts) == 0 and q.last_stats["restarts_last"] == 0
    # After dead_code_steps unused steps, code 3 sits on one of the last batch's encoder outputs.
    assert rows_in(q.embedding[3:], flat)
    assert int(q.restarts) == 1 and q.last_stats["restarts"] == 1 and q.last_stats["restarts_last"] == 1
    assert int(q.steps_unused[3]) == 0 and q.steps_unused[:3].eq(0).all()


def test_dead_code_steps_zero_disables_restarts():
    q = quantizer(codebook_size=4, embedding_dim=2, dead_code_steps=0).train()
    set_codebook(q, torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [100.0, 100.0]]))
    for _ in range(5):
        q(to_grid(torch.zeros(6, 2), 2, 3))
    assert int(q.restarts) == 0 and q.embedding[3].norm() > 50


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k, tol", [(4, 0.05), (8, 0.3)])
def test_kmeans_init_finds_clusters(seed, k, tol):
    torch.manual_seed(seed)
    centres = torch.tensor([[5.0, 5.0], [-5.0, 5.0], [5.0, -5.0], [-5.0, -5.0]])
    flat = centres.repeat_interleave(50, 0) + 0.1 * torch.randn(200, 2)
    flat = flat[torch.randperm(200)]
    q = VectorQuantizer(dataclasses.replace(TINY, codebook_size=k, embedding_dim=2, dead_code_steps=0))
    assert not bool(q.initialized)
    q.train()(to_grid(flat, 10, 20))
    assert bool(q.initialized)
    assert torch.cdist(centres, q.embedding).min(1).values.max() < tol
    if k == 4:  # one code per cluster, and the EMA counts start from the cluster sizes
        torch.testing.assert_close(q.cluster_size, torch.full((4,), 50.0))


def test_random_batch_init_uses_encoder_outputs_once():
    torch.manual_seed(0)
    q = VectorQuantizer(dataclasses.replace(TINY, init="random_batch", ema=False, dead_code_steps=0)).train()
    z = torch.randn(2, 4, 4, 4)
    q(z)
    assert rows_in(q.embedding, flatten(z))
    assert len({tuple(row.tolist()) for row in q.embedding}) == 16  # 32 outputs, drawn without replacement
    codebook = q.embedding.detach().clone()
    q(torch.randn(2, 4, 4, 4) + 10)
    assert torch.equal(q.embedding.detach(), codebook)  # initialised once; no EMA, no optimizer step


def test_inference_never_updates_the_codebook():
    torch.manual_seed(0)
    model = VQVAE(TINY)  # training mode, not yet initialised
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(2, 1, 28, 28)
    model.encode_indices(x)
    model.reconstruct(x)
    model.eval()(x)
    after = model.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)


def test_state_dict_keys_do_not_depend_on_mode():
    torch.manual_seed(0)
    model = VQVAE(TINY)
    keys = set(model.state_dict())
    model.train()(torch.rand(2, 1, 28, 28))
    assert set(model.eval().state_dict()) == keys
    quantizer_keys = {k for k in keys if k.startswith("quantizer.")}
    assert quantizer_keys == {
        f"quantizer.{n}"
        for n in ("embedding", "cluster_size", "embed_avg", "initialized", "steps_unused", "restarts")
    }
    plain = {k for k in VQVAE(dataclasses.replace(TINY, ema=False)).state_dict() if k.startswith("quantizer.")}
    assert plain == quantizer_keys - {"quantizer.cluster_size", "quantizer.embed_avg"}


def test_loss_terms():
    torch.manual_seed(0)
    model = VQVAE(TINY).eval()
    x = torch.rand(3, 1, 28, 28)
    loss, terms = model.loss(x)
    assert set(terms) == {"loss", "rec", "vq", "perplexity", "codes_used", "restarts"}
    x_hat, indices, vq = model(x)
    torch.testing.assert_close(terms["rec"], F.mse_loss(x_hat, x))
    torch.testing.assert_close(terms["vq"], vq)
    torch.testing.assert_close(loss, terms["rec"] + terms["vq"])
    p = torch.bincount(indices.flatten(), minlength=16).float() / indices.numel()
    p = p[p > 0]
    torch.testing.assert_close(terms["perplexity"], torch.exp(-(p * p.log()).sum()))
    assert terms["codes_used"] == len(p) and terms["restarts"] == 0
    assert loss.requires_grad and not any(v.requires_grad for v in terms.values())


def test_batched_equals_per_item():
    torch.manual_seed(0)
    model = VQVAE(TINY).eval()
    x = torch.rand(4, 1, 28, 28)
    single = torch.cat([model.encode_indices(x[i : i + 1]) for i in range(4)])
    assert torch.equal(model.encode_indices(x), single)
    torch.testing.assert_close(
        model.reconstruct(x), torch.cat([model.reconstruct(x[i : i + 1]) for i in range(4)]), rtol=0, atol=1e-5
    )


def test_lookup_rejects_bad_indices():
    q = quantizer()
    with pytest.raises(ValueError, match="indices must lie in"):
        q.lookup(torch.full((1, 2, 2), 16))
    with pytest.raises(ValueError, match="integer"):
        q.lookup(torch.zeros(1, 2, 2))


def test_save_load_round_trip(tmp_path):
    from models.io import load_model, save_model

    torch.manual_seed(0)
    model = VQVAE(dataclasses.replace(TINY, codebook_size=64, dead_code_steps=1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):  # changes parameters and every codebook buffer
        opt.zero_grad()
        model.loss(torch.rand(2, 1, 28, 28))[0].backward()
        opt.step()
    assert bool(model.quantizer.initialized) and int(model.quantizer.restarts) > 0
    save_model(tmp_path / "vqvae.safetensors", model.eval(), name="vqvae", dataset="synthetic", command="pytest")
    loaded, info = load_model(tmp_path / "vqvae.safetensors")
    assert info.kind == "vqvae" and info.image_shape == (1, 28, 28) and loaded.config == model.config
    assert loaded.codebook_digest() == model.codebook_digest()
    x = torch.rand(3, 1, 28, 28)
    assert torch.equal(loaded.reconstruct(x), model.reconstruct(x))
    # Resuming: the loaded model continues training exactly like the original (no second init).
    for m in (model, loaded):
        torch.manual_seed(1)
        m.train()(x)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_codebook_digest_tracks_the_codebook():
    torch.manual_seed(0)
    model = VQVAE(TINY)
    digest = model.codebook_digest()
    assert len(digest) == 64 and digest == model.codebook_digest()
    with torch.no_grad():
        model.quantizer.embedding[0, 0] += 1
    assert model.codebook_digest() != digest


# Two gloo ranks with different data and different RNG seeds must end with identical codebooks.
DDP_EMA = dataclasses.replace(TINY, embedding_dim=2, init="kmeans", dead_code_steps=0)
DDP_RESTART = dataclasses.replace(TINY, embedding_dim=2, init="kmeans", dead_code_steps=1)


def ddp_batches(world: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100)
    batches = [torch.randn(2 * world, 2, 3, 3, generator=gen) for _ in range(3)]
    batches[1] += 10  # far from every code: most go unused and get restarted
    return batches


def ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(rank)
        for name, cfg in (("ema", DDP_EMA), ("restart", DDP_RESTART)):
            q = VectorQuantizer(cfg).train()
            for batch in ddp_batches(world):
                q(batch.chunk(world)[rank])
            save_file({k: v.contiguous() for k, v in q.state_dict().items()}, f"{out_dir}/{name}{rank}.safetensors")
    finally:
        dist.destroy_process_group()


def test_distributed_replicas_stay_identical(tmp_path):
    world = 2
    mp.spawn(ddp_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world)
    for name in ("ema", "restart"):
        rank0, rank1 = (load_file(tmp_path / f"{name}{r}.safetensors") for r in range(world))
        for key in rank0:
            assert torch.equal(rank0[key], rank1[key]), (name, key)
    assert int(load_file(tmp_path / "restart0.safetensors")["restarts"]) > 0

    # The all-reduced EMA equals one process that sees the whole batch, after rank 0's init.
    torch.manual_seed(0)
    ref = VectorQuantizer(DDP_EMA).train()
    batches = ddp_batches(world)
    ref._data_init(flatten(batches[0].chunk(world)[0]))
    for batch in batches:
        ref(batch)
    rank0 = load_file(tmp_path / "ema0.safetensors")
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(rank0[key], value, msg=key)


def test_logistic_decoder_scores_8_bit_images_and_shows_its_mean():
    from models.likelihood import DiscretizedLogisticMixture

    torch.manual_seed(0)
    config = VQVAEConfig(in_channels=3, image_size=8, hidden_channels=8, res_channels=4, n_res_blocks=1,
                         codebook_size=8, embedding_dim=4, likelihood="logistic", num_mixtures=3)
    model = VQVAE(config)
    x = torch.randint(256, (4, 3, 8, 8)).float() / 255
    params, _, vq_loss = model(x)
    assert params.shape == (4, DiscretizedLogisticMixture(3, 3).num_params, 8, 8)
    loss, stats = model.loss(x)
    nll = -DiscretizedLogisticMixture(3, 3).log_prob(params, x)  # (B,)
    torch.testing.assert_close(stats["rec"], nll.mean() / (3 * 8 * 8))  # nats per subpixel
    torch.testing.assert_close(loss, stats["rec"] + vq_loss)
    model.eval()
    codes = model.encode_indices(x)
    shown = model.decode_indices(codes)
    torch.testing.assert_close(shown, DiscretizedLogisticMixture(3, 3).mean(model.decode(model.quantizer.lookup(codes))))
    torch.testing.assert_close(model.reconstruct(x), shown)
    with pytest.raises(ValueError, match="likelihood='mse'"):
        VQVAE(VQVAEConfig(hidden_channels=8, codebook_size=4, embedding_dim=2)).log_likelihood(params, x)
    with pytest.raises(ValueError, match="gaussian"):
        VQVAEConfig(likelihood="gaussian")


def test_mean_mse_weight_adds_the_mean_images_squared_error_and_leaves_the_likelihood_alone():
    """The auxiliary term of colour training: objective(w) = objective(0) + w * MSE(unclamped mixture
    mean, x); the reported loss and rec (the nats) are the same."""
    torch.manual_seed(0)
    base = dataclasses.replace(TINY, in_channels=3, image_size=8, likelihood="logistic", num_mixtures=2)
    plain = VQVAE(base).eval()
    weighted = VQVAE(dataclasses.replace(base, mean_mse_weight=7.0)).eval()
    weighted.load_state_dict(plain.state_dict())
    x = torch.randint(0, 256, (3, 3, 8, 8)) / 255
    loss0, t0 = plain.loss(x)
    loss1, t1 = weighted.loss(x)
    out, _, _ = plain(x)
    mean_mse = F.mse_loss(plain.pixel_likelihood.mean(out, clamp=False), x)
    torch.testing.assert_close(t1["rec"], t0["rec"])
    torch.testing.assert_close(t1["loss"], t0["loss"])  # the reported loss stays paper eq. 3
    torch.testing.assert_close(t1["mean_mse"], mean_mse)
    torch.testing.assert_close(loss1, loss0 + 7.0 * mean_mse)
    assert "mean_mse" not in t0


@pytest.mark.parametrize("kwargs, needle", [
    (dict(mean_mse_weight=-1.0), "mean_mse_weight must be a finite number >= 0, got -1.0"),
    (dict(mean_mse_weight=float("nan")), "got nan"),
    (dict(mean_mse_weight=1.0), "applies to likelihood='logistic' only"),
])
def test_mean_mse_weight_is_checked(kwargs, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        VQVAEConfig(**kwargs)


def test_what_the_service_serves_is_the_models_own_arithmetic():
    """encode_nearest gives z_e and the argmin of the distances on_step sees; decode_nearest and
    reconstruct decode those codes; sample_from decodes what the prior draws from the same uniforms."""
    from models.pixelcnn import PixelCNN, PixelCNNConfig

    torch.manual_seed(0)
    model = VQVAE(TINY).eval()
    x = torch.rand(3, 1, 28, 28)
    seen = []
    z_e, codes = model.encode_nearest(x, on_step=seen.append)
    k = TINY.codebook_size
    assert torch.equal(z_e, model.encode(x)) and torch.equal(codes, model.encode_indices(x))
    (distances,) = seen
    assert distances.shape == (3, codes[0].numel() * k)
    assert torch.equal(distances.view(3, -1, k).argmin(-1), codes.flatten(1))
    images = model.decode_indices(codes)
    assert torch.equal(model.decode_nearest(z_e), images) and torch.equal(model.reconstruct(x), images)
    prior = PixelCNN(PixelCNNConfig(codebook_size=k, code_shape=tuple(codes.shape[1:]), num_classes=3,
                                    hidden_channels=8, n_layers=1, first_kernel_size=3, kernel_size=3)).eval()
    uniforms, labels = prior.draw_noise(3, torch.Generator().manual_seed(1))
    assert labels is not None and labels.shape == (3,)
    logits = []
    drawn = model.sample_from(prior, uniforms, 0.8, labels, on_step=logits.append)
    expected = prior.sample(3, labels=labels, temperature=0.8, uniforms=uniforms)
    assert torch.equal(drawn, model.decode_indices(expected)) and len(logits) == codes[0].numel()
