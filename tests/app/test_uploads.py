"""POST /reconstruct, /encode, /interpolate, /decode: formats, shapes, invariants, errors."""

import asyncio
import base64
import threading

import numpy as np
import torch
import pytest
from starlette.responses import JSONResponse

from app.routes import uploads as upload_routes

from .conftest import CODEBOOK_SIZE, cell, grid_size, image_bytes, png_array

# One app for the module's questions (tests that need other settings start their own with `serve`): the
# async tests run in the module's event loop, that of `module_app` (the mark's warning on sync tests is moot)
pytestmark = [pytest.mark.asyncio(loop_scope="module"),
              pytest.mark.filterwarnings("ignore:The test <Function .* is marked with '@pytest.mark.asyncio'")]


@pytest.fixture
def client(module_app):
    return module_app[1]

FORMAT_MODES = [
    ("PNG", "L"), ("PNG", "RGB"), ("PNG", "RGBA"), ("PNG", "P"), ("PNG", "I;16"), ("PNG", "LA"),
    ("JPEG", "L"), ("JPEG", "RGB"),
    ("GIF", "L"), ("GIF", "P"),
    ("WEBP", "RGB"), ("WEBP", "RGBA"),
    ("BMP", "L"), ("BMP", "RGB"), ("BMP", "P"),
]


def files(*blobs, field="file"):
    return [(field, (f"img{i}", blob)) for i, blob in enumerate(blobs)]


async def reconstruct(client, *blobs, model="vae", **kw):
    return await client.post("/reconstruct", params={"model": model}, files=files(*blobs), **kw)


async def test_reconstruct_accepts_common_formats_modes_and_sizes(client):
    """Every format x mode x size on one app (starting an app per case was a minute of the suite)."""
    failures = []
    for fmt, mode in FORMAT_MODES:
        for size in [(8, 8), (31, 17), (300, 200)]:
            r = await reconstruct(client, image_bytes(fmt, mode, size))
            ok = r.status_code == 200 and r.headers["content-type"] == "image/png" and png_array(r.content).shape == (8, 8)
            if not ok:
                failures.append((fmt, mode, size, r.status_code, r.text[:200]))
    assert failures == []


async def test_rgb_model_reconstructs_in_rgb(client):
    r = await reconstruct(client, image_bytes("JPEG", "L", (40, 40)), model="vae_rgb")
    assert png_array(r.content).shape == (8, 8, 3)


async def test_several_files_give_one_grid_whose_cells_are_the_single_answers(client):
    blobs = [image_bytes(seed=i) for i in range(5)]
    r = await reconstruct(client, *blobs)
    grid = png_array(r.content)
    assert grid.shape[::-1] == grid_size(5, nrow=3)
    for i, blob in enumerate(blobs):
        alone = png_array((await reconstruct(client, blob)).content)
        assert np.array_equal(cell(grid, i, nrow=3), alone)


async def test_reconstruct_json_gives_one_png_per_file(client):
    blobs = [image_bytes(seed=i) for i in range(2)]
    r = await reconstruct(client, *blobs, headers={"Accept": "application/json"})
    images = [base64.b64decode(s) for s in r.json()["images"]]
    assert len(images) == 2
    assert images[1] == (await reconstruct(client, blobs[1])).content  # a one-image grid is the image itself


@pytest.mark.parametrize("blob, detail", [(b"garbage bytes", "not a decodable image"), (b"", "is empty")])
async def test_undecodable_or_empty_files_are_400(client, blob, detail):
    r = await reconstruct(client, blob)
    assert r.status_code == 400 and detail in r.json()["detail"] and "img0" in r.json()["detail"]


async def test_missing_file_field_is_422(client):
    r = await client.post("/reconstruct", params={"model": "vae"}, files=[("other", ("x", image_bytes()))])
    assert r.status_code == 422
    r = await client.post("/reconstruct", params={"model": "vae"})
    assert r.status_code == 422


async def test_limits_give_413_and_422(serve):
    async with serve(max_upload_bytes=2000, max_pixels=300, max_files=2) as (_app, client):
        big = image_bytes("BMP", "RGB", (30, 30))  # ~2.7 kB
        r = await reconstruct(client, big)
        assert r.status_code == 413 and "than max_upload_bytes (2000)" in r.json()["detail"]
        r = await reconstruct(client, image_bytes("PNG", "L", (20, 20)))  # 400 pixels, a small file
        assert r.status_code == 413 and "20x20 = 400 pixels; the limit is 300" in r.json()["detail"]
        r = await reconstruct(client, *[image_bytes(seed=i) for i in range(3)])
        assert r.status_code == 422 and "at most 2 files" in r.json()["detail"]
        r = await client.post("/reconstruct", params={"model": "vae"}, content=b"x" * (2 * 2000 + 2**20 + 1),
                              headers={"content-type": "multipart/form-data; boundary=zz"})
        assert r.status_code == 413 and "request body exceeds" in r.json()["detail"]

        sent = []

        async def chunks():  # a well-formed multipart body without Content-Length, its file too long
            yield b'--zz\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\n'
            for _ in range(5):
                sent.append(1)
                yield b"x" * 300_000

        r = await client.post("/reconstruct", params={"model": "vae"}, content=chunks(),
                              headers={"content-type": "multipart/form-data; boundary=zz"})
        assert r.status_code == 413 and r.json()["detail"] == "file 'a' has more bytes than max_upload_bytes (2000)"
        assert len(sent) < 5  # refused at the first chunk over the limit (read one message ahead at most): the rest never read

        async def json_chunks():  # a JSON body without Content-Length, over max_json_bytes
            yield b'{"model": "vae", "z": ['
            for _ in range(3):
                yield b"[0.1, 0.2, 0.3, 0.4]," * 20_000

        r = await client.post("/decode", content=json_chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413 and "request body exceeds 1048576 bytes (max_json_bytes)" in r.json()["detail"]


async def test_a_bad_file_fails_only_its_own_request(serve):
    async with serve(max_wait_ms=50) as (app, client):
        good = [reconstruct(client, image_bytes(seed=i)) for i in range(4)]
        results = await asyncio.gather(reconstruct(client, b"junk"), *good)
    assert results[0].status_code == 400
    assert [r.status_code for r in results[1:]] == [200] * 4


async def test_encode_vae_gives_mu_and_logvar(client):
    r = await client.post("/encode", params={"model": "vae"}, files=files(image_bytes(seed=0), image_bytes(seed=1)))
    body = r.json()
    assert r.status_code == 200 and body["model"] == "vae" and body["kind"] == "vae"
    assert [item["file"] for item in body["items"]] == ["img0", "img1"]
    assert all(len(item["mu"]) == 4 and len(item["logvar"]) == 4 for item in body["items"])
    assert body["items"][0]["mu"] != body["items"][1]["mu"]


async def test_encode_vqvae_gives_code_grids_and_z_e_on_request(client):
    r = await client.post("/encode", params={"model": "vqvae"}, files=files(image_bytes()))
    [item] = r.json()["items"]
    assert set(item) == {"file", "codes"}
    assert np.array(item["codes"]).shape == (2, 2) and all(0 <= c < CODEBOOK_SIZE for row in item["codes"] for c in row)
    r = await client.post("/encode", params={"model": "vqvae", "include_z_e": True}, files=files(image_bytes()))
    [item] = r.json()["items"]
    assert np.array(item["z_e"]).shape == (4, 2, 2)
    r = await client.post("/encode", params={"model": "vae", "include_z_e": True}, files=files(image_bytes()))
    assert r.status_code == 422 and "include_z_e applies to VQ-VAE" in r.json()["detail"]


async def test_decoding_the_encoding_is_the_reconstruction(client):
    blobs = [image_bytes(seed=i) for i in range(3)]
    for model, key in (("vae", "mu"), ("vqvae", "codes")):
        items = (await client.post("/encode", params={"model": model}, files=files(*blobs))).json()["items"]
        decoded = await client.post("/decode", json={"model": model, ("z" if key == "mu" else "codes"): [i[key] for i in items]})
        assert decoded.status_code == 200
        assert decoded.content == (await reconstruct(client, *blobs, model=model)).content


async def test_decode_json_and_grid(client):
    z = [[0.1 * i, 0, -0.5, 1] for i in range(5)]
    r = await client.post("/decode", json={"model": "vae", "z": z})
    assert png_array(r.content).shape[::-1] == grid_size(5, nrow=3)
    r = await client.post("/decode", json={"model": "vqvae", "codes": [[[0, 1], [2, 15]]]}, headers={"Accept": "application/json"})
    assert len(r.json()["images"]) == 1


@pytest.mark.parametrize(
    "body, detail",
    [
        (b'{"model": "vae", "z": [[0, 0, 0, 0], [0, 0, NaN, 0]]}', "z[1][2] = nan is not a finite float32"),
        (b'{"model": "vae", "z": [[0, 0, 0, Infinity]]}', "z[0][3] = inf is not a finite float32"),
        (b'{"model": "vae", "z": [[0, 0, 0, 1e39]]}', "z[0][3] = 1e+39 is not a finite float32"),
        (b'{"model": "vae", "z": [[0, 0, 0, 0], [1, 2, 3]]}', "z[1] has 3 values; the model's latent_dim is 4"),
        (b'{"model": "vae", "z": []}', "z must hold between 1 and 256 items, got 0"),
        (b'{"model": "vae", "codes": [[[0, 0], [0, 0]]]}', "is a VAE: send 'z'"),
        (b'{"model": "vqvae", "z": [[0, 0, 0, 0]]}', "is a VQ-VAE: send 'codes'"),
        (b'{"model": "vqvae", "codes": [[[0, 1], [2, 16]]]}', "codes[0][1][1] = 16 is out of range: codes lie in [0, 16)"),
        (b'{"model": "vqvae", "codes": [[[0, 1], [2, 3]], [[-1, 0], [0, 0]]]}', "codes[1][0][0] = -1 is out of range"),
        (b'{"model": "vqvae", "codes": [[[0, 1], [2, 3], [4, 5]]]}', "codes[0] has 3 rows; the model's code grid is 2x2"),
        (b'{"model": "vqvae", "codes": [[[0, 1], [2]]]}', "codes[0][1] has 1 columns"),
        (b'{"model": "vqvae", "codes": [[[0, 1.5], [2, 3]]]}', "int"),
        (b'{"model": "vae", "z": [[0, 0, 0, 0]',  "JSON"),
        (b'{"z": [[0, 0, 0, 0]]}', "model"),
        (b'Infinity', "'inf'"),  # a bare non-finite body is echoed back as a string, not a 500
        (b'{"model": NaN, "z": [[0, 0, 0, 0]]}', "'nan'"),
    ],
)
async def test_decode_errors_are_422_naming_the_index(client, body, detail):
    r = await client.post("/decode", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422
    assert detail in str(r.json()["detail"])


async def test_decode_too_many_latents_is_422(serve):
    async with serve(max_n=3) as (_app, client):
        r = await client.post("/decode", json={"model": "vae", "z": [[0, 0, 0, 0]] * 4})
    assert r.status_code == 422 and "between 1 and 3 items, got 4" in r.json()["detail"]


async def interpolate(client, a, b, **params):
    return await client.post("/interpolate", params=params, files=[("a", ("a.png", a)), ("b", ("b.png", b))])


@pytest.mark.parametrize("model", ["vae", "vqvae", "vae_rgb"])
@pytest.mark.parametrize("method", ["lerp", "slerp"])
async def test_interpolation_ends_are_the_reconstructions(client, model, method):
    a, b = image_bytes("PNG", "RGB", (20, 20), seed=1), image_bytes("JPEG", "L", (8, 8), seed=2)
    steps = 7
    r = await interpolate(client, a, b, model=model, steps=steps, method=method)
    assert r.status_code == 200, r.text
    strip = png_array(r.content)
    assert strip.shape[:2] == (12, steps * 10 + 2)
    rec_a = png_array((await reconstruct(client, a, model=model)).content)
    rec_b = png_array((await reconstruct(client, b, model=model)).content)
    assert np.array_equal(cell(strip, 0, nrow=steps), rec_a)
    assert np.array_equal(cell(strip, steps - 1, nrow=steps), rec_b)


async def test_interpolation_json_and_defaults(client):
    a, b = image_bytes(seed=1), image_bytes(seed=2)
    r = await client.post("/interpolate", params={"model": "vae"}, files=[("a", ("a", a)), ("b", ("b", b))],
                          headers={"Accept": "application/json"})
    images = r.json()["images"]
    assert len(images) == 8  # steps defaults to 8
    assert base64.b64decode(images[0]) == (await reconstruct(client, a)).content


@pytest.mark.parametrize("params", [{"steps": 1}, {"steps": 65}, {"method": "cubic"}, {"steps": "x"}])
async def test_interpolation_parameters_out_of_range_are_422(client, params):
    r = await interpolate(client, image_bytes(), image_bytes(), model="vae", **params)
    assert r.status_code == 422


async def test_interpolation_needs_both_files(client):
    r = await client.post("/interpolate", params={"model": "vae"}, files=[("a", ("a", image_bytes()))])
    assert r.status_code == 422
    r = await interpolate(client, image_bytes(), b"nope", model="vae")
    assert r.status_code == 400 and "'b.png' is not a decodable image" in r.json()["detail"]




async def test_large_answers_are_written_off_the_event_loop_and_a_small_one_at_once(client, monkeypatch):
    # A 64-file /encode with z_e is megabytes of JSON: FastAPI validated and wrote it on the event
    # loop, stalling /health by half a second; now it is written in the PNG pool's threads, as are
    # JSON image answers over SMALL_IMAGE_ELEMENTS (60 images of 8x8 here). One image is encoded on
    # the event loop (a fraction of a millisecond), never queued in the pool behind other grids.
    from app import imaging

    threads: dict[str, list[str]] = {"encode": [], "json": [], "png": []}

    def spy(kind, original):
        return lambda *args: threads[kind].append(threading.current_thread().name) or original(*args)

    monkeypatch.setattr(upload_routes, "_encoding_response", spy("encode", upload_routes._encoding_response))
    monkeypatch.setattr(JSONResponse, "render", spy("json", JSONResponse.render))
    monkeypatch.setattr(imaging, "grid_png", spy("png", imaging.grid_png))
    three = [("file", (f"{i}.png", image_bytes(seed=i))) for i in range(3)]
    r = await client.post("/encode", params={"model": "vqvae", "include_z_e": "true"}, files=three)
    assert r.status_code == 200 and len(r.json()["items"]) == 3
    sixty = [("file", (f"{i}.png", image_bytes(seed=i))) for i in range(60)]
    r = await client.post("/reconstruct", params={"model": "vae"}, files=sixty, headers={"accept": "application/json"})
    assert r.status_code == 200 and len(r.json()["images"]) == 60
    one = await client.get("/sample", params={"model": "vae", "n": 1, "seed": 1})
    many = await client.get("/sample", params={"model": "vae", "n": 64, "seed": 1})
    assert one.status_code == many.status_code == 200
    assert threads["encode"] and all(name.startswith("genserve-io") for name in threads["encode"]), threads
    assert threads["json"] and all(name.startswith("genserve-io") for name in threads["json"]), threads
    assert threads["png"][0] == threading.main_thread().name and threads["png"][1].startswith("genserve-io"), threads



async def test_the_encode_answer_holds_the_encoders_float32_values_in_the_documented_schema(serve):
    from app import imaging
    from app.schemas import EncodeResponse

    files = [("file", (f"{i}.png", image_bytes(seed=i))) for i in range(2)]
    async with serve() as (app, client):
        registry = app.state.service.registry
        for params in ({"model": "vqvae", "include_z_e": "true"}, {"model": "vqvae"}, {"model": "vae"}):
            r = await client.post("/encode", params=params, files=files)
            assert r.status_code == 200 and r.headers["content-type"] == "application/json"
            answer = EncodeResponse.model_validate(r.json())
            entry = registry.get(params["model"])
            x = torch.stack([imaging.decode_upload(data, name, image_shape=entry.image_shape, max_pixels=10**6)
                             for _, (name, data) in files])
            with torch.inference_mode():
                expected = entry.model.encode(x)
            for i, item in enumerate(answer.items):
                assert item.file == f"{i}.png"
                if params["model"] == "vae":
                    assert torch.allclose(torch.tensor(item.mu), expected[0][i], atol=1e-5)
                elif "include_z_e" in params:
                    z_e = torch.tensor(item.z_e)
                    assert z_e.shape == expected[i].shape and torch.allclose(z_e, expected[i], atol=1e-5)
                else:
                    assert item.z_e is None and "z_e" not in r.json()["items"][i]


async def test_a_small_answer_is_encoded_at_once_not_queued_behind_big_ones(client, monkeypatch):
    # One image is encoded on the event loop (a fraction of a millisecond), so it never waits in the
    # PNG pool behind the 256-image grids of other requests; a grid still goes to the pool.
    from app import imaging

    threads = []
    original = imaging.grid_png
    monkeypatch.setattr(imaging, "grid_png", lambda *a: threads.append(threading.current_thread().name) or original(*a))
    one = await client.get("/sample", params={"model": "vae", "n": 1, "seed": 1})
    many = await client.get("/sample", params={"model": "vae", "n": 64, "seed": 1})
    assert one.status_code == many.status_code == 200
    assert threads[0] == threading.main_thread().name and threads[1].startswith("genserve-io"), threads


async def test_the_encode_answer_is_the_json_fastapi_would_write(client):
    files = [("file", (f"{i}.png", image_bytes(seed=i))) for i in range(2)]
    for params in ({"model": "vqvae", "include_z_e": "true"}, {"model": "vqvae"}, {"model": "vae"}):
        r = await client.post("/encode", params=params, files=files)
        assert r.status_code == 200 and r.headers["content-type"] == "application/json"
        assert r.content == JSONResponse(r.json()).body  # compact, key order kept, one object


async def test_a_file_that_is_no_accepted_image_is_refused_from_its_first_bytes(client):
    # An ICO (the review's bomb carried a 12000x12000 PNG in one) is refused as soon as its first 16
    # bytes have come: the rest of its body is never read, let alone decoded.
    boundary = "sniffsniff"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"bomb.ico\"\r\n"
            "Content-Type: image/x-icon\r\n\r\n").encode() + b"\x00\x00\x01\x00\x01\x00\x10\x10" + b"\x00" * 56
    sent = []

    async def body():
        sent.append(head)
        yield head
        for _ in range(200):  # 200 x 32 KiB more would follow
            sent.append(b"")
            yield b"\x00" * 32768

    r = await client.post("/reconstruct", params={"model": "vae"}, content=body(),
                          headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 400 and r.json()["detail"] == (
        "file 'bomb.ico' is not a decodable image (not one of PNG, JPEG, GIF, WEBP, BMP, TIFF)")
    assert len(sent) < 10  # refused after the first chunks, not after 6 MiB
