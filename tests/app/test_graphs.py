"""CUDA graphs (app/graphs.py, GENSERVE_CUDA_GRAPHS): the static buffers, pass sizes, padding and
fallbacks on the CPU (record=False runs each function eagerly on the very buffers a graph would
be recorded on), the recorded graphs themselves where CUDA is available."""

from __future__ import annotations

import threading

import pytest
import torch

from app.graphs import CapturedPasses, CapturedPriorSteps, describe, graph_sizes, pad_rows, recorded_sizes, size_for
from app.operations import operations
from app.registry import Registry
from app.settings import Settings
from models.pixelcnn import GatedPixelCNN, GatedPixelCNNConfig, PixelCNN, PixelCNNConfig
from models.pixelcnnpp import PixelCNNpp, PixelCNNppConfig

CPU = torch.device("cpu")
SIZES = (1, 2, 4)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="recording a CUDA graph needs a CUDA device")


def test_sizes_and_padding():
    assert graph_sizes([4, 1, 2, 4]) == (1, 2, 4)
    with pytest.raises(ValueError, match="positive"):
        graph_sizes([0, 2])
    with pytest.raises(ValueError, match="positive"):
        graph_sizes([])
    assert [size_for(n, (1, 2, 4)) for n in (1, 2, 3, 4, 5)] == [1, 2, 4, 4, None]
    t = torch.arange(6).reshape(3, 2)
    padded = pad_rows(t, 5)
    assert padded.shape == (5, 2) and torch.equal(padded[:3], t) and torch.equal(padded[3:], t[-1:].expand(2, 2))
    assert pad_rows(t, 2) is t


@pytest.fixture(scope="module")
def registry(weights_dir) -> Registry:
    return Registry.load(weights_dir, CPU)


def padded_eager(fn, inputs, size):
    """What fn computes for `inputs` inside a pass of `size` rows (the last row repeated), first rows."""
    rows = inputs[0].shape[0]
    with torch.inference_mode():
        out = fn(*(pad_rows(t, size) for t in inputs))
    return tuple(o[:rows] for o in out)


def captured_operations(registry: Registry):
    return [op for entry in registry.entries.values() for op in operations(entry) if op.capture is not None]


def test_which_operations_offer_graphs(registry):
    names = {str(op.key) for op in captured_operations(registry)}
    # the factorized VAE's one-pass decoders and the VQ-VAE's, and every prior's sampling
    assert names == {
        "vae:reconstruct", "vae:decode", "vae:sample",
        "vqvae:reconstruct", "vqvae:decode", "vqvae:decode_nearest",
        "vqvae:sample:pixelcnn", "vqvae:sample:gated", "vqvae:sample:pixelcnnpp",
    }
    # an autoregressive decoder draws pixel after pixel, reading values back: it stays eager
    assert not any(op.key.model == "vae_rgb" and op.capture for entry in registry.entries.values()
                   for op in operations(entry))


@pytest.mark.parametrize("rows", [1, 3, 4, 6])
def test_captured_operation_computes_what_eager_computes(registry, rows):
    """Each operation through its static buffers (record=False) equals the eager function on the
    same rows padded to the same pass size; above the largest size (6 > 4) it runs eagerly."""
    for op in captured_operations(registry):
        fn = op.capture(SIZES, CPU, None, False)
        inputs = op.example(rows, torch.Generator().manual_seed(rows))
        with torch.inference_mode():
            got = fn(*inputs)
        size = size_for(rows, SIZES) or rows
        want = padded_eager(fn.reference if size in SIZES else op.fn, inputs, size)
        assert len(got) == len(want), op.key
        for g, w in zip(got, want):
            assert g.shape[0] == rows and torch.equal(g, w), (op.key, rows)
        assert recorded_sizes(fn) == list(SIZES)


def test_one_pass_bodies_compute_what_the_operations_compute(registry):
    """A recorded body leaves out only what cannot be recorded (the codes' range check): on valid
    inputs it computes exactly what the operation computes."""
    for op in captured_operations(registry):
        if op.key.prior:
            continue  # a prior's recorded step is sampling mode "stepped", the service's eager one "cached"
        fn = op.capture(SIZES, CPU, None, False)
        inputs = op.example(4, torch.Generator().manual_seed(0))
        with torch.inference_mode():
            assert all(torch.equal(a, b) for a, b in zip(fn.reference(*inputs), op.fn(*inputs))), op.key


def test_buffers_are_not_returned(registry):
    """A pass's outputs are copies: the next pass through the same buffers leaves them alone."""
    op = next(op for op in captured_operations(registry) if str(op.key) == "vqvae:decode")
    fn = op.capture(SIZES, CPU, None, False)
    a_in, b_in = (op.example(2, torch.Generator().manual_seed(s)) for s in (1, 2))
    with torch.inference_mode():
        (a,) = fn(*a_in)
        kept = a.clone()
        fn(*b_in)
    assert torch.equal(a, kept)


def test_concurrent_passes_share_buffers_safely(registry):
    """The batcher's pass and its express pass may run at once in two threads: each recording's
    buffers are held by one pass at a time, so every pass gets its own rows' results."""
    op = next(op for op in captured_operations(registry) if str(op.key) == "vqvae:decode")
    fn = op.capture((4,), CPU, None, False)
    inputs = [op.example(3, torch.Generator().manual_seed(s)) for s in range(8)]
    want = [padded_eager(op.fn, x, 4)[0] for x in inputs]
    got: dict[int, torch.Tensor] = {}

    def run(i: int) -> None:
        with torch.inference_mode():
            for _ in range(20):
                got[i] = fn(*inputs[i])[0]
                assert torch.equal(got[i], want[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(got[i], want[i]) for i in range(8))


def tiny_priors():
    common = dict(codebook_size=16, code_shape=(3, 4), hidden_channels=8)
    return [PixelCNN(PixelCNNConfig(**common, n_layers=2, num_classes=3)),
            GatedPixelCNN(GatedPixelCNNConfig(**common, n_layers=2)),
            PixelCNNpp(PixelCNNppConfig(**common, n_layers=1, num_classes=3))]


@pytest.mark.parametrize("prior", tiny_priors(), ids=lambda m: type(m).__name__)
def test_prior_steps_draw_what_sampling_draws(prior):
    """The per-position step, replayed at every position from the static buffers, draws the codes
    that sampling mode "stepped" (and "naive", the reference) draws from the same uniforms in a pass
    of the same size; on_logits sees every position, in raster order, with copies of its logits."""
    torch.manual_seed(0)
    prior.eval()
    steps = CapturedPriorSteps(prior, (2, 8), CPU, record=False)
    assert steps.sizes == (2, 8) and not steps.failures
    n, (h, w) = 5, prior.config.code_shape
    g = torch.Generator().manual_seed(1)
    u, t = torch.rand(n, h, w, generator=g), 0.5 + torch.rand(n, generator=g)
    y = torch.randint(3, (n,), generator=g) if prior.config.num_classes else None
    seen = []
    with torch.inference_mode():
        codes = steps.sample(u, t, y, on_logits=lambda r, c, logits: seen.append((r, c, logits)))
        padded = dict(labels=None if y is None else pad_rows(y, 8), temperature=pad_rows(t, 8), uniforms=pad_rows(u, 8))
        want = prior.sample(8, mode="stepped", **padded)[:n]
        naive = prior.sample(8, mode="naive", **padded)[:n]
    assert codes.shape == (n, h, w) and torch.equal(codes, want) and torch.equal(codes, naive)
    assert [(r, c) for r, c, _ in seen] == [(r, c) for r in range(h) for c in range(w)]
    assert all(logits.shape == (n, 16) for *_, logits in seen)
    assert seen[0][2].data_ptr() != seen[1][2].data_ptr()  # copies, not the static buffer
    assert steps.sample(torch.rand(9, h, w), torch.ones(9), None if y is None else torch.zeros(9, dtype=torch.long)) is None


def test_recording_on_the_cpu_falls_back_to_eager(registry):
    """Asked to record where there is no CUDA, every size fails with the reason, and every pass runs eagerly."""
    op = next(op for op in captured_operations(registry) if str(op.key) == "vae:decode")
    fn = op.capture(SIZES, CPU, None, True)
    assert fn.sizes == () and set(fn.failures) == set(SIZES)
    assert all("CUDA graphs need a CUDA device" in why for why in fn.failures.values())
    assert "not recorded" in describe(fn) and recorded_sizes(fn) == []
    inputs = op.example(3, torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(fn(*inputs)[0], op.fn(*inputs)[0])


def test_a_function_that_cannot_be_recorded_runs_eagerly():
    def body(x: torch.Tensor) -> tuple[torch.Tensor]:
        if x.sum().item() > 1e9:  # a value read back to the host
            raise AssertionError
        raise RuntimeError("not recordable")

    calls = []

    def eager(x):
        calls.append(x.shape[0])
        return (x * 2,)

    fn = CapturedPasses(body, lambda n, g: (torch.rand(n, 3, generator=g),), (1, 2), CPU, record=False, eager=eager)
    assert fn.sizes == () and set(fn.failures) == {1, 2} and "RuntimeError: not recordable" in fn.failures[1]
    assert torch.equal(fn(torch.ones(2, 3))[0], torch.full((2, 3), 2.0)) and calls == [2]


async def test_the_service_records_nothing_on_the_cpu(serve, caplog):
    """cuda_graphs on a CPU service: it starts, says why nothing is recorded, and GET /config shows
    every batcher eager (graph_sizes null)."""
    caplog.set_level("INFO")
    async with serve(cuda_graphs=True) as (app, client):
        config = (await client.get("/config")).json()
    assert config["cuda_graphs"] is True and set(config["graph_sizes"].values()) == {None}
    assert "nothing to record" in caplog.text


async def test_the_service_serves_through_the_buffers(serve):
    """The service's wiring, on the CPU: the batchers' functions replaced by their static-buffer
    runs (record=False) answer every graphed endpoint with the bytes the eager service gives."""
    requests = [("GET", "/sample?model=vae&n=3&seed=5"), ("GET", "/sample?model=vqvae&prior=gated&n=3&seed=5&label=1"),
                ("GET", "/sample?model=vqvae&prior=pixelcnn&n=2&seed=7"),
                ("POST", "/decode", {"model": "vqvae", "codes": [[[1, 2], [3, 4]], [[0, 15], [7, 7]]]}),
                ("POST", "/decode", {"model": "vae", "z": [[0.1, -0.2, 0.3, 0.0]]})]

    async def answers(client) -> list[bytes]:
        out = []
        for method, url, *body in requests:
            r = await client.request(method, url, json=body[0] if body else None)
            assert r.status_code == 200, (url, r.text)
            out.append(r.content)
        return out

    async with serve() as (_app, client):
        eager = await answers(client)
    async with serve(cuda_graphs=True) as (app, client):
        service = app.state.service
        await service._record_graphs(record=False)
        sizes = service.graph_sizes()
        batchers = {str(k): b for k, b in service.batchers.items()}
        # recorded at the pass sizes the eager check kept; the check, run again on the recorded
        # functions, keeps those of them that stay batch-invariant (a prior's "stepped" draws differ)
        for name, recorded in sizes.items():
            if recorded is not None:
                assert set(batchers[name].buckets) <= set(recorded) and batchers[name].buckets[-1] == 8, name
        assert sizes["vqvae:sample:gated"] and sizes["vae:decode"]
        assert sizes["vae_rgb:decode"] is None and sizes["vqvae:encode"] is None
        assert await answers(client) == eager


@needs_cuda
def test_recorded_graphs_replay_what_eager_computes(weights_dir):
    """On a GPU: every graphed operation's replay equals its eager call on the same device, bit for bit."""
    device = torch.device("cuda")
    registry = Registry.load(weights_dir, device)
    for op in [op for entry in registry.entries.values() for op in operations(entry) if op.capture is not None]:
        fn = op.capture(SIZES, device, None, True)
        assert recorded_sizes(fn) == list(SIZES), describe(fn)
        for rows in (1, 3, 4):
            inputs = tuple(t.to(device) for t in op.example(rows, torch.Generator().manual_seed(rows)))
            with torch.inference_mode():
                got = fn(*inputs)
            want = padded_eager(fn.reference, inputs, size_for(rows, SIZES))
            assert all(torch.equal(g, w) for g, w in zip(got, want)), (op.key, rows)


def test_settings_default_off():
    assert Settings().cuda_graphs is False


def test_prior_steps_check_their_inputs():
    """The recorded sampler checks what every sampler checks before any input reaches its buffers
    (on a GPU a label out of range would be a device-side assert, fatal to the process's CUDA context)."""
    prior = tiny_priors()[0].eval()  # class-conditional, 3 classes
    steps = CapturedPriorSteps(prior, (4,), CPU, record=False)
    u, t, y = torch.rand(2, 3, 4), torch.ones(2), torch.tensor([0, 2])
    for bad, match in [(dict(labels=None), "class-conditional"), (dict(labels=torch.tensor([0, 7])), "out of range"),
                       (dict(temperature=torch.tensor([1.0, 0.0])), "positive"),
                       (dict(uniforms=torch.full((2, 3, 4), 1.5)), r"\[0, 1\)"),
                       (dict(uniforms=torch.rand(2, 4, 3)), "shape")]:
        args = dict(uniforms=u, temperature=t, labels=y) | bad
        with pytest.raises(ValueError, match=match), torch.inference_mode():
            steps.sample(**args)


def test_a_pass_that_finds_its_buffers_taken_computes_the_same_eagerly(registry):
    """The express pass and the main pass may want the same size at once: the second does not wait
    for the first (a prior's sample holds its buffers through h * w steps) but computes the same
    arithmetic eagerly, so its answer is the same whichever ran."""
    for key in ("vqvae:decode", "vqvae:sample:gated"):
        op = next(op for op in captured_operations(registry) if str(op.key) == key)
        fn = op.capture((4,), CPU, None, False)
        inputs = op.example(3, torch.Generator().manual_seed(3))
        with torch.inference_mode():
            free = fn(*inputs)
            recording = (fn.steps if op.key.prior else fn).recordings[4]
            with recording.lock:  # another pass holds them
                busy = fn(*inputs)
        assert all(torch.equal(a, b) for a, b in zip(free, busy)), key


def test_each_operation_is_its_models_method(registry):
    """app/operations.py's TABLE: an Operation computes exactly what the model method it names
    computes on the same inputs (a prior's sample: VQVAE.sample_from with that prior), and its
    probe returns those outputs first."""
    from app.operations import TABLE

    for entry in registry.entries.values():
        for op in operations(entry):
            inputs = op.example(3, torch.Generator().manual_seed(1))
            if op.key.op == "score" and entry.kind == "vqvae":  # VQVAE.nll_labelled under the prior (or none)
                prior = entry.priors[op.key.prior].model if op.key.prior else None
                direct = entry.model.nll_labelled(prior, *inputs)
            elif op.key.prior:
                direct = (entry.model.sample_from(entry.priors[op.key.prior].model, *inputs),)
            else:
                out = getattr(entry.model, TABLE[entry.kind][op.key.op].name)(*inputs)
                direct = (out,) if isinstance(out, torch.Tensor) else tuple(out)
            with torch.inference_mode():
                got = op.fn(*inputs)
                probed = op.probe(*inputs) if op.probe is not None else got
            assert len(got) == len(direct) and all(torch.equal(a, b) for a, b in zip(got, direct)), op.key
            assert all(torch.equal(a, b) for a, b in zip(probed, direct)) and len(probed) >= len(direct), op.key


def test_sample_inputs_draw_the_documented_noise(registry):
    """What /sample submits, from its seed: VAE randn(n, D), rand(n, U, H, W), then n temperatures;
    a conditional prior rand(n, h, w), the temperatures, then randint(classes, (n,)) (or the label)."""
    from app.operations import sample_inputs

    vae = registry.get("vae").model
    eps, uniforms, temps = sample_inputs(vae, 3, 7, 0.6)
    g = torch.Generator().manual_seed(7)
    assert torch.equal(eps, torch.randn(3, vae.config.latent_dim, generator=g))
    assert torch.equal(uniforms, torch.rand(vae.uniform_shape(3), generator=g)) and temps.tolist() == [0.6000000238418579] * 3
    entry = registry.get("vqvae")
    conditional = next(p.model for p in entry.priors.values() if p.num_classes)
    uniforms, temps, labels = sample_inputs(entry.model, 2, 7, 1.0, conditional)
    g = torch.Generator().manual_seed(7)
    assert torch.equal(uniforms, torch.rand(2, *conditional.config.code_shape, generator=g))
    assert torch.equal(labels, torch.randint(conditional.config.num_classes, (2,), generator=g))
    assert sample_inputs(entry.model, 2, 7, 1.0, conditional, 1)[2].tolist() == [1, 1]


def test_only_many_step_operations_stop_between_steps(registry, monkeypatch):
    """A prior's draws, an autoregressive decoder's pixels and a VQ-VAE's score (its prior passes, one per
    label) call check_wanted between steps (a pass nobody waits for stops; the CPU goes to a less-served
    model); a one-pass operation never does."""
    import app.operations as app_operations

    calls = []
    monkeypatch.setattr(app_operations, "check_wanted", lambda: calls.append(1))
    for entry in registry.entries.values():
        for op in operations(entry):
            calls.clear()
            with torch.inference_mode():
                op.fn(*op.example(2, torch.Generator().manual_seed(0)))
            many = (op.key.prior is not None and op.key.op == "sample") or (entry.kind == "vqvae" and op.key.op == "score") or (
                entry.kind == "vae" and entry.model.config.autoregressive and op.key.op not in ("encode", "score", "score_map"))
            assert bool(calls) == many, (op.key, len(calls))
