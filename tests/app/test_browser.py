"""The page (GET /) in a real browser: headless Chromium driven by Selenium against uvicorn.

The app serves the tiny models of conftest.py (or the folder in GENSERVE_BROWSER_WEIGHTS, which must
hold a VAE `vae` and a VQ-VAE `vqvae` with a class-conditional prior `gated`, as weights/ does: the
README's screenshots come from it). Skips when selenium, chromium (or chromium-browser) or chromedriver is
missing; CI's .ci/run tries to install them. Screenshots at desktop (1280x900) and phone
(390x844) width go to GENSERVE_SCREENSHOTS (default: the test's tmp_path).
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from PIL import Image

from app.routes.page import STATIC_DIR

from .conftest import live_server

pytestmark = pytest.mark.browser

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
WAIT_S = 120.0  # a request on a busy 2-core machine (the shipped autoregressive VAE draws 784 pixels one by one)
DESKTOP, PHONE = (1280, 900), (390, 844)

if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)", allow_module_level=True)


@pytest.fixture(scope="module")
def server_url(weights_dir):
    """The real app under uvicorn in a thread, on a socket bound here (port 0); its base URL."""
    weights = Path(os.environ.get("GENSERVE_BROWSER_WEIGHTS") or weights_dir)
    with live_server(weights, WAIT_S) as url:
        yield url


@pytest.fixture(scope="module")
def driver():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run",
                "--disable-extensions", f"--window-size={DESKTOP[0]},{DESKTOP[1]}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    browser.set_script_timeout(30)
    yield browser
    browser.quit()


@pytest.fixture
def page(driver, server_url):
    """The page loaded at desktop size with its model list in; afterwards, no script error in its console."""
    viewport(driver, *DESKTOP)
    driver.get(server_url + "/")
    models = httpx.get(server_url + "/models", timeout=60).json()
    wait_for(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#model-cards .card")) == len(models), "model cards")
    driver.get_log("browser")  # drop what came before
    yield driver
    errors = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    # A failed request logs "Failed to load resource: ... status of 422"; the tests cause those on purpose.
    assert [m for m in errors if "Failed to load resource" not in m] == []


def viewport(driver, width: int, height: int) -> None:
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600})


def wait_for(driver, condition, what: str):
    try:
        # an element the page replaces between finding it and reading it: look again
        wait = WebDriverWait(driver, WAIT_S, poll_frequency=0.1, ignored_exceptions=(StaleElementReferenceException,))
        return wait.until(condition)
    except TimeoutException:
        pytest.fail(f"timed out waiting for {what}")


def settled(driver, selector: str) -> list:
    """Wait until every element matching `selector` is done or failed; the elements."""
    def check(d):
        found = d.find_elements(By.CSS_SELECTOR, selector)
        return found if found and all(e.get_attribute("data-state") in ("done", "error") for e in found) else False
    return wait_for(driver, check, f"{selector} to finish")


def image_pixels(driver, img) -> np.ndarray:
    """What an <img> shows, (H, W, 4) RGBA at its natural size, read through a canvas: the page's CSP
    (connect-src 'self') lets no script fetch the blob: or data: URL behind it, and need not."""
    width, height, b64 = driver.execute_script("""
        const img = arguments[0], canvas = document.createElement("canvas");
        [canvas.width, canvas.height] = [img.naturalWidth, img.naturalHeight];
        const context = canvas.getContext("2d");
        context.drawImage(img, 0, 0);
        let s = "";
        for (const byte of context.getImageData(0, 0, canvas.width, canvas.height).data) s += String.fromCharCode(byte);
        return [canvas.width, canvas.height, btoa(s)];""", img)
    return np.frombuffer(base64.b64decode(b64), np.uint8).reshape(height, width, 4)


def png_pixels(data: bytes) -> np.ndarray:
    """A PNG's pixels as the page's canvas reads them: (H, W, 4) RGBA."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGBA"))


def fill(element, value: str) -> None:
    element.clear()
    element.send_keys(value)


def run_sample(driver, **fields: str) -> None:
    form = driver.find_element(By.ID, "sample-form")
    for name, value in fields.items():
        fill(form.find_element(By.NAME, name), value)
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    settled(driver, "#sample")


def upload(driver, picker: str, path: Path) -> None:
    driver.find_element(By.CSS_SELECTOR, f"{picker} input[type=file]").send_keys(str(path))


def test_an_upload_is_reconstructed_by_every_model(page, server_url, tmp_path) -> None:
    models = httpx.get(server_url + "/models", timeout=60).json()
    path = tmp_path / "stripes.png"
    arr = np.zeros((40, 30), np.uint8)
    arr[::4] = 255
    Image.fromarray(arr, "L").save(path)
    upload(page, "#recon-picker", path)
    cells = settled(page, "#recon-results .pair")
    assert sorted(c.get_attribute("data-model") for c in cells) == sorted(m["name"] for m in models)
    for cell, model in zip(cells, models):
        assert cell.get_attribute("data-state") == "done", cell.text
        c, h, w = model["image_shape"]
        shown = cell.find_element(By.CSS_SELECTOR, ".slot.input canvas")  # the input as the model sees it
        assert (int(shown.get_attribute("width")), int(shown.get_attribute("height"))) == (w, h)
        out = image_pixels(page, cell.find_element(By.CSS_SELECTOR, ".slot.output img"))
        expected = httpx.post(server_url + "/reconstruct", params={"model": model["name"]},
                              files={"file": ("stripes.png", path.read_bytes(), "image/png")}, timeout=60)
        assert Image.open(io.BytesIO(expected.content)).mode == ("L" if c == 1 else "RGB")
        assert out.shape == (h, w, 4) and np.array_equal(out, png_pixels(expected.content))
    curl = page.find_element(By.CSS_SELECTOR, "#reconstruct pre.curl").text
    assert "-F 'file=@stripes.png'" in curl and f"{server_url}/reconstruct?model=vae'" in curl

    page.find_element(By.CSS_SELECTOR, '#recon-picker .bundled button[data-file="sneaker.png"]').click()
    wait_for(page, lambda d: "sneaker.png" in d.find_element(By.CSS_SELECTOR, "#reconstruct pre.curl").text, "the bundled image")
    assert all(c.get_attribute("data-state") == "done" for c in settled(page, "#recon-results .pair"))


def test_the_same_seed_draws_the_same_grid(page, server_url) -> None:
    form = page.find_element(By.ID, "sample-form")
    Select(form.find_element(By.NAME, "model")).select_by_value("vqvae")
    Select(form.find_element(By.NAME, "prior")).select_by_value("gated")
    label = form.find_element(By.NAME, "label")
    assert label.is_displayed()  # gated is class-conditional
    vqvae = next(m for m in httpx.get(server_url + "/models", timeout=60).json() if m["name"] == "vqvae")
    names = next(p for p in vqvae["priors"] if p["name"] == "gated")["class_names"]  # the server resolves them
    Select(label).select_by_visible_text(f"{names[1]} (1)" if names else "label 1")  # by class name where recorded
    params = {"model": "vqvae", "prior": "gated", "label": "1", "n": "4", "temperature": "0.9"}

    run_sample(page, n="4", temperature="0.9", seed="1234")
    grid = page.find_element(By.ID, "sample-grid")
    first = image_pixels(page, grid)
    assert page.find_element(By.ID, "sample-seed").text == "1234"
    expected = httpx.get(server_url + "/sample", params={**params, "seed": "1234"}, timeout=60).content
    assert np.array_equal(first, png_pixels(expected))
    curl = page.find_element(By.CSS_SELECTOR, "#sample pre.curl").text
    assert "seed=1234" in curl and "label=1" in curl and "prior=gated" in curl

    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    settled(page, "#sample")
    assert np.array_equal(image_pixels(page, grid), first)

    form.find_element(By.NAME, "new-seed").click()
    wait_for(page, lambda d: d.find_element(By.ID, "sample-seed").text not in ("", "1234"), "a new seed")
    settled(page, "#sample")
    seed = form.find_element(By.NAME, "seed").get_attribute("value")
    assert page.find_element(By.ID, "sample-seed").text == seed and 0 <= int(seed) < 2**63
    expected = httpx.get(server_url + "/sample", params={**params, "seed": seed}, timeout=60).content
    assert np.array_equal(image_pixels(page, grid), png_pixels(expected))

    run_sample(page, seed="")  # no seed: the server draws one, and the page shows and keeps it
    drawn = page.find_element(By.ID, "sample-seed").text
    assert drawn.isdigit() and form.find_element(By.NAME, "seed").get_attribute("value") == drawn


def test_an_interpolation_shows_its_strip_and_the_slider_walks_it(page, server_url) -> None:
    form = page.find_element(By.ID, "interp-form")
    Select(form.find_element(By.NAME, "model")).select_by_value("vae")
    Select(form.find_element(By.NAME, "method")).select_by_value("lerp")
    fill(form.find_element(By.NAME, "steps"), "5")
    wait_for(page, lambda d: len(d.find_elements(By.CSS_SELECTOR, '#interpolate .bundled [aria-pressed="true"]')) == 2,
             "the default ends")
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    assert settled(page, "#interpolate")[0].get_attribute("data-state") == "done"

    frames = page.find_elements(By.CSS_SELECTOR, "#interp-strip img")
    files = {end: (f"{name}.png", (STATIC_DIR / "samples" / f"{name}.png").read_bytes(), "image/png")
             for end, name in (("a", "tshirt"), ("b", "trouser"))}
    expected = httpx.post(server_url + "/interpolate", params={"model": "vae", "steps": 5, "method": "lerp"}, files=files,
                          headers={"Accept": "application/json"}, timeout=60).json()["images"]
    assert len(frames) == len(expected) == 5
    assert all(np.array_equal(image_pixels(page, f), png_pixels(base64.b64decode(s))) for f, s in zip(frames, expected))

    big = page.find_element(By.ID, "interp-frame")
    assert big.get_attribute("src") == frames[0].get_attribute("src")
    page.find_element(By.ID, "interp-slider").send_keys(Keys.END)
    assert big.get_attribute("src") == frames[-1].get_attribute("src")
    assert page.find_element(By.ID, "interp-info").text == "frame 5 of 5 · t = 1"
    page.find_element(By.ID, "interp-slider").send_keys(Keys.LEFT)
    assert "frame 4 of 5 · t = 0.75" == page.find_element(By.ID, "interp-info").text
    assert "-F 'a=@tshirt.png' -F 'b=@trouser.png'" in page.find_element(By.CSS_SELECTOR, "#interpolate pre.curl").text


def test_api_errors_are_shown_as_messages(page, tmp_path) -> None:
    run_sample(page, temperature="0")
    error = page.find_element(By.CSS_SELECTOR, "#sample > .error")
    assert page.find_element(By.ID, "sample").get_attribute("data-state") == "error" and error.is_displayed()
    assert error.text == "temperature: Input should be greater than or equal to 0.001 (HTTP 422, invalid parameter)"

    run_sample(page, temperature="1", seed="soon")
    assert error.text.startswith("seed: Input should be a valid integer")

    path = tmp_path / "notes.png"
    path.write_text("not an image")
    upload(page, "#recon-picker", path)
    for cell in settled(page, "#recon-results .pair"):
        message = cell.find_element(By.CSS_SELECTOR, ".error")
        assert cell.get_attribute("data-state") == "error" and message.is_displayed()
        assert message.text == "file 'notes.png' is not a decodable image (not one of PNG, JPEG, GIF, WEBP, BMP, TIFF) (HTTP 400, unusable image)"


def test_screenshots_at_desktop_and_phone_width(page, tmp_path) -> None:
    folder = Path(os.environ.get("GENSERVE_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    page.find_element(By.CSS_SELECTOR, '#recon-picker .bundled button[data-file="tshirt.png"]').click()
    Select(page.find_element(By.CSS_SELECTOR, "#sample-form [name=model]")).select_by_value("vqvae")
    run_sample(page, seed="7", n="16")
    Select(page.find_element(By.CSS_SELECTOR, "#interp-form [name=model]")).select_by_value("vqvae")
    page.find_element(By.CSS_SELECTOR, "#interp-form button[type=submit]").click()
    settled(page, "#recon-results .pair")
    settled(page, "#interpolate")
    for name, (width, height) in (("desktop", DESKTOP), ("phone", PHONE)):
        viewport(page, width, height)
        # nothing wider than the screen: the page scrolls only down
        assert page.execute_script("return document.documentElement.scrollWidth") <= width, name
        page.execute_script("document.getElementById('reconstruct').scrollIntoView()")  # the results, not the cards
        assert page.save_screenshot(str(folder / f"{name}.png"))
        full = page.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
        (folder / f"{name}-full.png").write_bytes(base64.b64decode(full["data"]))
        with Image.open(folder / f"{name}.png") as shot:
            assert shot.size == (width, height)


def test_each_card_shows_its_bits_per_dim_table(page) -> None:
    """conftest.py: vae_rgb records an IWAE bound; gated (class-conditional) and pixelcnnpp a prior's bound;
    vae records none, so its card has no table."""
    def table(name: str) -> list[list[str]]:
        card = page.find_element(By.CSS_SELECTOR, f'#model-cards .card[data-model="{name}"]')
        return [[cell.text for cell in row.find_elements(By.CSS_SELECTOR, "th, td")]
                for row in card.find_elements(By.CSS_SELECTOR, "table.bits tbody tr")]

    assert table("vae_rgb") == [["IWAE-10: −log p(x)", "5.25", "698.7"]]
    # the prior's bound is told each image's class: named as a bound on -log p(x | y), not -log p(x)
    assert table("vqvae") == [["prior gated, class given: −log p(x | y)", "3.25", "–"],
                              ["prior gated, class marginalised: −log p(x)", "3.4", "–"],
                              ["prior pixelcnnpp: −log p(x)", "3.5", "–"]]
    assert table("vae") == []
    vae = page.find_element(By.CSS_SELECTOR, '#model-cards .card[data-model="vae"]')
    assert vae.find_elements(By.CSS_SELECTOR, "table.bits") == []


def test_a_colour_model_samples_and_interpolates_in_colour(page, server_url) -> None:
    """An RGB model: its grid is the server's RGB PNG, and the ends the user has not picked become the
    bundled colour (CIFAR-10) images, until the user picks one; a grey model gets grey ends back."""
    form = page.find_element(By.ID, "sample-form")
    Select(form.find_element(By.NAME, "model")).select_by_value("vae_rgb")
    assert not form.find_element(By.NAME, "prior").is_displayed() and not form.find_element(By.NAME, "label").is_displayed()
    run_sample(page, n="4", seed="11", temperature="1")
    shown = image_pixels(page, page.find_element(By.ID, "sample-grid"))
    expected = httpx.get(server_url + "/sample", params={"model": "vae_rgb", "n": 4, "seed": 11, "temperature": "1"},
                         timeout=60).content
    assert Image.open(io.BytesIO(expected)).mode == "RGB"
    assert np.array_equal(shown, png_pixels(expected))
    assert (shown[..., 0] != shown[..., 1]).any() or (shown[..., 1] != shown[..., 2]).any()  # not all grey

    def pressed() -> list[str]:
        return [b.get_attribute("data-file") for b in page.find_elements(By.CSS_SELECTOR, '#interpolate .bundled [aria-pressed="true"]')]

    interp = page.find_element(By.ID, "interp-form")
    Select(interp.find_element(By.NAME, "model")).select_by_value("vae_rgb")
    wait_for(page, lambda d: pressed() == ["car.png", "horse.png"], "the colour ends")
    fill(interp.find_element(By.NAME, "steps"), "3")
    interp.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    assert settled(page, "#interpolate")[0].get_attribute("data-state") == "done"
    files = {end: (f"{name}.png", (STATIC_DIR / "samples" / f"{name}.png").read_bytes(), "image/png")
             for end, name in (("a", "car"), ("b", "horse"))}
    expected = httpx.post(server_url + "/interpolate", params={"model": "vae_rgb", "steps": 3, "method": "slerp"},
                          files=files, headers={"Accept": "application/json"}, timeout=60).json()["images"]
    frames = page.find_elements(By.CSS_SELECTOR, "#interp-strip img")
    assert len(frames) == 3
    assert all(np.array_equal(image_pixels(page, f), png_pixels(base64.b64decode(s))) for f, s in zip(frames, expected))

    # a user's pick stays when the model changes; the other end follows the model
    page.find_element(By.CSS_SELECTOR, '#interp-a .bundled button[data-file="cat.png"]').click()
    wait_for(page, lambda d: pressed() == ["cat.png", "horse.png"], "the picked end")
    Select(interp.find_element(By.NAME, "model")).select_by_value("vae")
    wait_for(page, lambda d: pressed() == ["cat.png", "trouser.png"], "a grey end for the grey model")
