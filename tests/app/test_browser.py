"""The page (GET /) in a real browser: headless Chromium driven by Selenium against uvicorn.

The app serves the tiny models of conftest.py (or the folder in GENSERVE_BROWSER_WEIGHTS, which must
hold a VAE `vae` and a VQ-VAE `vqvae` with a class-conditional prior `gated`, as weights/ does: the
README's screenshots come from it, with
`GENSERVE_BROWSER_WEIGHTS=weights GENSERVE_SCREENSHOTS=app/static/screenshots pytest tests/app/test_browser.py -k screenshots`).
Skips when selenium, chromium (or chromium-browser) or chromedriver is missing; CI's .ci/run tries to
install them. Screenshots at desktop (1280x900) and phone (390x844) width go to GENSERVE_SCREENSHOTS
(default: the test's tmp_path).
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import shutil
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from app.routes.page import STATIC_DIR

from .conftest import live_server

pytestmark = pytest.mark.browser

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
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
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})  # performance: the network
    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    browser.set_script_timeout(30)
    yield browser
    browser.quit()


PANELS = ("#reconstruct", "#sample", "#interpolate", "#score")  # each shows a result made on load, without a click


@pytest.fixture
def page(driver, server_url):
    """The page loaded at desktop size, its model list in and the results it makes on load shown;
    afterwards, no script error in its console."""
    load(driver, server_url)
    driver.get_log("browser")  # drop what came before
    yield driver
    errors = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    # A failed request logs "Failed to load resource: ... status of 422"; the tests cause those on purpose.
    assert [m for m in errors if "Failed to load resource" not in m] == []


def load(driver, server_url: str, models: list[dict] | None = None) -> None:
    """Open the page at desktop size and wait for its model cards and the results it makes on load.
    With `models`, the page reads that list from GET /models instead of the server's (window.fetch
    wrapped before the page's module runs)."""
    viewport(driver, *DESKTOP)
    script = None
    if models is not None:
        script = driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": """
            const fetchFromServer = window.fetch, models = MODELS;
            window.fetch = async (resource, init) => {
              const response = await fetchFromServer(resource, init);
              if (new URL(String(resource), location.href).pathname !== "/models") return response;
              return new Response(JSON.stringify(models), { headers: { "Content-Type": "application/json" } });
            };""".replace("MODELS", json.dumps(models))})["identifier"]
    try:
        driver.get(server_url + "/")
        count = len(models if models is not None else httpx.get(server_url + "/models", timeout=60).json())
        wait_for(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#model-cards .card")) == count, "model cards")
        for panel in PANELS:
            settled(driver, panel)
    finally:
        if script is not None:
            driver.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument", {"identifier": script})


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


def url_pixels(driver, url: str) -> np.ndarray:
    """The pixels of an image the page links to (a download's blob: URL), as image_pixels reads them."""
    img = driver.execute_async_script("""
        const [url, done] = arguments, img = new Image();
        img.onload = () => { document.body.append(img); done(img); };
        img.onerror = () => done(null);
        img.src = url;""", url)
    assert img is not None, url
    pixels = image_pixels(driver, img)
    driver.execute_script("arguments[0].remove()", img)
    return pixels


def text(driver, selector: str) -> str:
    """An element's text, shown or not (Selenium's .text is empty for what is hidden)."""
    return driver.find_element(By.CSS_SELECTOR, selector).get_attribute("textContent")


def shown(driver, selector: str) -> list:
    return [e for e in driver.find_elements(By.CSS_SELECTOR, selector) if e.is_displayed()]


def run_sample(driver, **fields: str) -> None:
    form = driver.find_element(By.ID, "sample-form")
    for name, value in fields.items():
        fill(form.find_element(By.NAME, name), value)
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    settled(driver, "#sample")


def upload(driver, picker: str, path: Path) -> None:
    driver.find_element(By.CSS_SELECTOR, f"{picker} input[type=file]").send_keys(str(path))


def reconstructed(driver, name: str) -> list:
    """Wait until `name` is the image reconstructed (its curl names it) and every model has answered; the cells."""
    wait_for(driver, lambda d: f"file=@{name}" in text(d, "#reconstruct pre.curl"), f"{name} to be picked")
    settled(driver, "#reconstruct")
    return driver.find_elements(By.CSS_SELECTOR, "#recon-results .pair")


def offered(models: list[dict], operation: str) -> list[str]:
    """The models that offer `operation` (all of them from a server whose /models has no `operations`)."""
    return [m["name"] for m in models if operation in m.get("operations", [operation])]


def open_cards(driver) -> None:
    for card in driver.find_elements(By.CSS_SELECTOR, "#model-cards details.card:not([open])"):
        driver.execute_script("arguments[0].open = true", card)


def test_the_page_opens_on_results(page, server_url) -> None:
    """Without a click: a bundled image reconstructed by every model that can, a sample grid with its seed and
    an interpolation; the model cards and their metric tables collapsed below them."""
    models = httpx.get(server_url + "/models", timeout=60).json()
    cells = page.find_elements(By.CSS_SELECTOR, "#recon-results .pair")
    assert [c.get_attribute("data-model") for c in cells] == offered(models, "reconstruct")
    for cell in cells:
        assert cell.get_attribute("data-state") == "done" and cell.find_element(By.CSS_SELECTOR, ".slot.output img").is_displayed()
    # the grey image where most models are grey (conftest.py's and weights/'s are)
    assert page.find_element(By.CSS_SELECTOR, '#recon-picker .bundled [aria-pressed="true"]').get_attribute("data-file") == "tshirt.png"
    assert page.find_element(By.ID, "sample-grid").is_displayed() and page.find_element(By.ID, "sample-seed").text.isdigit()
    assert len(shown(page, "#interp-strip img")) == 8 and page.find_element(By.ID, "interp-frame").is_displayed()
    assert all(page.find_element(By.CSS_SELECTOR, p).get_attribute("data-state") == "done" for p in PANELS)

    # the curl lines fetch the bundled images they upload first, so they run as shown in any directory
    recon_curl, interp_curl = text(page, "#reconstruct pre.curl").splitlines(), text(page, "#interpolate pre.curl").splitlines()
    assert recon_curl[0] == f"curl -fsS -O '{server_url}/static/samples/tshirt.png'" and "file=@tshirt.png" in recon_curl[2]
    assert interp_curl[0].startswith("curl -fsS -O ") and interp_curl[0].count("/static/samples/") == 2
    for url in re.findall(r"-O '([^']+)'", recon_curl[0] + interp_curl[0]):
        assert httpx.get(url, timeout=10).headers["content-type"] == "image/png"

    order = page.execute_script("return [...document.querySelectorAll('main > section')].map(s => s.id)")
    assert order == ["reconstruct", "sample", "interpolate", "score", "models"]
    scored = page.find_elements(By.CSS_SELECTOR, "#score-results .pair")
    assert [c.get_attribute("data-model") for c in scored] == offered(models, "score")
    assert all(c.get_attribute("data-state") == "done" and c.find_element(By.CSS_SELECTOR, ".slot.output img").is_displayed()
               for c in scored)
    cards = page.find_elements(By.CSS_SELECTOR, "#model-cards details.card")
    assert len(cards) == len(models) and not any(c.get_attribute("open") for c in cards)
    assert shown(page, "#model-cards table") == [] and shown(page, "#model-cards dl") == []
    vqvae = page.find_element(By.CSS_SELECTOR, '#model-cards .card[data-model="vqvae"]')
    vqvae.find_element(By.TAG_NAME, "summary").click()  # opens on demand
    assert vqvae.get_attribute("open") and vqvae.find_element(By.CSS_SELECTOR, "table.bits").is_displayed()

    for width, height in (DESKTOP, PHONE):  # the first reconstruction is on the first screen
        viewport(page, width, height)
        page.execute_script("window.scrollTo(0, 0)")
        first = page.find_element(By.CSS_SELECTOR, "#recon-results .pair .slot.output img")
        assert page.execute_script("return arguments[0].getBoundingClientRect().bottom", first) <= height, width
    viewport(page, *DESKTOP)


def test_the_page_offers_each_model_only_what_it_lists(driver, server_url) -> None:
    """GET /models' `operations`: `vae` made to list only decode and sample (as a model without a latent, like
    the shipped vae_context) is not offered for reconstruct or interpolate; a model whose entry has no
    `operations` (an older server) is offered everything."""
    models = httpx.get(server_url + "/models", timeout=60).json()
    for m in models:
        m.pop("operations", None)
    next(m for m in models if m["name"] == "vae")["operations"] = ["decode", "sample"]
    load(driver, server_url, models)
    names = [m["name"] for m in models]
    others = [n for n in names if n != "vae"]

    assert [c.get_attribute("data-model") for c in driver.find_elements(By.CSS_SELECTOR, "#recon-results .pair")] == others
    assert driver.find_element(By.ID, "recon-skipped").text == "Not shown: vae, which does not reconstruct (it has no latent)."
    assert "model=vae\"" not in text(driver, "#reconstruct pre.curl") and "for m in " + " ".join(others) + "; do" in text(driver, "#reconstruct pre.curl")

    def options(form: str) -> list[str]:
        return [o.get_attribute("value") for o in driver.find_elements(By.CSS_SELECTOR, f"#{form} [name=model] option")]

    assert options("sample-form") == names and options("interp-form") == others
    assert "model=vae&" not in text(driver, "#interpolate pre.curl")

    open_cards(driver)
    def offers(name: str) -> str:
        card = driver.find_element(By.CSS_SELECTOR, f'#model-cards .card[data-model="{name}"]')
        terms = [t.text for t in card.find_elements(By.CSS_SELECTOR, "dl > dt")]
        return card.find_elements(By.CSS_SELECTOR, "dl > dd")[terms.index("Offers")].text

    assert offers("vae") == "decode, sample"
    assert offers("vqvae") == "reconstruct, encode, decode, interpolate, sample, score"
    button = driver.find_element(By.CSS_SELECTOR, '#model-cards .card[data-model="vae"] button')
    assert button.text == "Use for sample"
    button.click()
    assert Select(driver.find_element(By.CSS_SELECTOR, "#sample-form [name=model]")).first_selected_option.get_attribute("value") == "vae"


def stripes(folder: Path) -> Path:
    """A 30x40 grey PNG of white rows every 4 pixels, not square (so the page crops it): its path."""
    path = folder / "stripes.png"
    arr = np.zeros((40, 30), np.uint8)
    arr[::4] = 255
    Image.fromarray(arr, "L").save(path)
    return path


def test_an_upload_is_reconstructed_by_every_model(page, server_url, tmp_path) -> None:
    models = httpx.get(server_url + "/models", timeout=60).json()
    path = stripes(tmp_path)
    upload(page, "#recon-picker", path)
    cells = reconstructed(page, "stripes.png")
    recon = [m for m in models if m["name"] in offered(models, "reconstruct")]
    assert [c.get_attribute("data-model") for c in cells] == [m["name"] for m in recon]
    for cell, model in zip(cells, recon):
        assert cell.get_attribute("data-state") == "done", cell.text
        c, h, w = model["image_shape"]
        shown_input = cell.find_element(By.CSS_SELECTOR, ".slot.input canvas")  # the input as the model sees it
        assert (int(shown_input.get_attribute("width")), int(shown_input.get_attribute("height"))) == (w, h)
        out = image_pixels(page, cell.find_element(By.CSS_SELECTOR, ".slot.output img"))
        expected = httpx.post(server_url + "/reconstruct", params={"model": model["name"]},
                              files={"file": ("stripes.png", path.read_bytes(), "image/png")}, timeout=60)
        assert Image.open(io.BytesIO(expected.content)).mode == ("L" if c == 1 else "RGB")
        assert out.shape == (h, w, 4) and np.array_equal(out, png_pixels(expected.content))
    assert page.find_element(By.CSS_SELECTOR, "#recon-picker .drop .name").text == "stripes.png"
    curl = text(page, "#reconstruct pre.curl").splitlines()
    assert curl == [f"for m in {' '.join(m['name'] for m in recon)}; do",
                    f"""  curl -fsS -F 'file=@stripes.png' -o "$m.png" "{server_url}/reconstruct?model=$m\"""", "done"]

    page.find_element(By.CSS_SELECTOR, '#recon-picker .bundled button[data-file="sneaker.png"]').click()
    assert all(c.get_attribute("data-state") == "done" for c in reconstructed(page, "sneaker.png"))
    assert not page.find_element(By.CSS_SELECTOR, "#recon-picker .drop .name").is_displayed()  # the button says it


def scored(driver, name: str) -> list:
    """Wait until `name` is the image scored (its curl names it) and every model has answered; the cells."""
    wait_for(driver, lambda d: f"file=@{name}" in text(d, "#score pre.curl"), f"{name} to be picked for scoring")
    settled(driver, "#score")
    return driver.find_elements(By.CSS_SELECTOR, "#score-results .pair")


def test_an_upload_is_scored_by_every_model_that_can(page, server_url, tmp_path) -> None:
    """The Score panel: each model's bits/dim and WebP complexity score as /score gives them, its heat map
    (the same PNG), and "no threshold" where the file stores none (conftest.py's files store none)."""
    models = httpx.get(server_url + "/models", timeout=60).json()
    path = stripes(tmp_path)
    upload(page, "#score-picker", path)
    cells = scored(page, "stripes.png")
    names = offered(models, "score")
    assert [c.get_attribute("data-model") for c in cells] == names and names
    assert "vae" not in names and "Not shown: vae," in text(page, "#score-skipped")  # conftest's Bernoulli VAE
    for cell, name in zip(cells, names):
        assert cell.get_attribute("data-state") == "done", cell.text
        body = httpx.post(server_url + "/score", params={"model": name, "k": 100, "codec": "webp", "map": "true"},
                          files={"file": ("stripes.png", path.read_bytes(), "image/png")}, timeout=60).json()
        item = body["items"][0]
        numbers = dict(zip([e.text for e in cell.find_elements(By.CSS_SELECTOR, ".numbers dt")],
                           [e.text for e in cell.find_elements(By.CSS_SELECTOR, ".numbers dd")]))
        assert numbers == {"bits/dim": f"{item['bits_per_dim']:.3f}", "minus WebP": f"{item['complexity_score']['webp']:.3f}",
                           "verdict": "no threshold"}
        heat = image_pixels(page, cell.find_element(By.CSS_SELECTOR, ".slot.output img"))
        assert np.array_equal(heat, png_pixels(base64.b64decode(item["map_png"])))
    curl = text(page, "#score pre.curl").splitlines()
    assert curl == [f"for m in {' '.join(names)}; do",
                    f"""  curl -fsS -F 'file=@stripes.png' -o "$m.json" "{server_url}/score?model=$m&k=100&codec=webp&map=true\"""",
                    "done"]


def test_the_score_panel_shows_the_verdict(driver, server_url) -> None:
    """A verdict from /score (added here to the server's answers, as conftest.py's files store no threshold) is
    shown as typical or unusual, with the value and the threshold in its title."""
    script = driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": """
        const fetchFromServer = window.fetch;
        let calls = 0;
        window.fetch = async (resource, init) => {
          const response = await fetchFromServer(resource, init);
          if (new URL(String(resource), location.href).pathname !== "/score" || !response.ok) return response;
          const body = await response.json(), unusual = calls++ % 2 === 0;
          for (const item of body.items) item.verdict = { score: "webp", value: 1.25, threshold: 0.5, unusual };
          return new Response(JSON.stringify(body), { headers: { "Content-Type": "application/json" } });
        };"""})["identifier"]
    try:
        load(driver, server_url)
    finally:
        driver.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument", {"identifier": script})
    verdicts = driver.find_elements(By.CSS_SELECTOR, "#score-results .verdict")
    assert len(verdicts) == len(driver.find_elements(By.CSS_SELECTOR, "#score-results .pair")) > 1
    assert {v.text for v in verdicts} == {"typical", "unusual"}
    for v in verdicts:
        assert v.get_attribute("title") == "webp score 1.250 against the threshold 0.500"
        assert ("unusual" in v.get_attribute("class").split()) == (v.text == "unusual")


def test_a_bad_upload_is_one_message_at_the_picker_and_clears_the_results(page, tmp_path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("not an image")
    assert shown(page, "#recon-results .slot.output img")  # the results made on load
    upload(page, "#recon-picker", path)
    reconstructed(page, "notes.png")
    message = "file 'notes.png' is not a decodable image (not one of PNG, JPEG, GIF, WEBP, BMP, TIFF) (HTTP 400, unusable image)"
    errors = shown(page, "#reconstruct .error")
    assert [e.text for e in errors] == [message]
    # at the picker: the message follows it
    assert page.execute_script("return arguments[0].previousElementSibling.id", errors[0]) == "recon-picker"
    assert page.find_element(By.TAG_NAME, "body").text.count("is not a decodable image") == 1
    assert all(c.get_attribute("data-state") == "error" for c in page.find_elements(By.CSS_SELECTOR, "#recon-results .pair"))
    assert not page.find_element(By.ID, "recon-results").is_displayed()  # nothing of the tshirt's left under it
    assert shown(page, "#recon-results img, #recon-results canvas") == []
    assert "cannot" not in text(page, "#recon-results")
    # the drop zone: no broken thumbnail, the file's name once
    assert not page.find_element(By.CSS_SELECTOR, "#recon-picker .thumb").is_displayed()
    assert page.find_element(By.CSS_SELECTOR, "#recon-picker .drop .name").text == "notes.png (your browser cannot show it)"
    assert page.execute_script("return [...document.images].filter(i => i.complete && i.getAttribute('src') && !i.naturalWidth"
                               " && i.checkVisibility()).length") == 0

    page.find_element(By.CSS_SELECTOR, '#recon-picker .bundled button[data-file="bag.png"]').click()
    reconstructed(page, "bag.png")
    assert shown(page, "#reconstruct .error") == [] and page.find_element(By.ID, "recon-results").is_displayed()
    assert page.find_element(By.CSS_SELECTOR, "#recon-picker .thumb").is_displayed()


def test_a_failed_request_marks_the_result_it_did_not_replace_as_out_of_date(page) -> None:
    sample, figure = page.find_element(By.ID, "sample"), page.find_element(By.CSS_SELECTOR, "#sample .result")
    assert figure.is_displayed() and figure.get_attribute("data-stale") is None
    run_sample(page, temperature="0")
    error = page.find_element(By.CSS_SELECTOR, "#sample .error")
    assert sample.get_attribute("data-state") == "error" and error.is_displayed()
    assert error.text == "temperature: Input should be greater than or equal to 0.001 (HTTP 422, invalid parameter)"
    assert figure.get_attribute("data-stale") == "true"
    assert page.find_element(By.CSS_SELECTOR, "#sample .stale-note").text.startswith("Out of date: the last request failed.")
    assert float(page.find_element(By.ID, "sample-grid").value_of_css_property("opacity")) < 0.5

    run_sample(page, temperature="1", seed="soon")
    assert error.text.startswith("seed: Input should be a valid integer") and figure.get_attribute("data-stale") == "true"
    run_sample(page, seed="")
    assert not error.is_displayed() and figure.get_attribute("data-stale") is None
    assert not page.find_element(By.CSS_SELECTOR, "#sample .stale-note").is_displayed()

    fill(page.find_element(By.CSS_SELECTOR, "#interp-form [name=steps]"), "1")
    page.find_element(By.CSS_SELECTOR, "#interp-form button[type=submit]").click()
    settled(page, "#interpolate")
    assert page.find_element(By.CSS_SELECTOR, "#interpolate .error").text.startswith("steps: Input should be greater than or equal to 2")
    assert page.find_element(By.CSS_SELECTOR, "#interpolate .result").get_attribute("data-stale") == "true"
    assert page.find_element(By.CSS_SELECTOR, "#interpolate .stale-note").is_displayed()


def test_sample_draws_a_new_seed_each_press_unless_one_is_typed(page, server_url) -> None:
    form = page.find_element(By.ID, "sample-form")
    Select(form.find_element(By.NAME, "model")).select_by_value("vqvae")
    Select(form.find_element(By.NAME, "prior")).select_by_value("gated")
    label = form.find_element(By.NAME, "label")
    assert label.is_displayed()  # gated is class-conditional
    vqvae = next(m for m in httpx.get(server_url + "/models", timeout=60).json() if m["name"] == "vqvae")
    names = next(p for p in vqvae["priors"] if p["name"] == "gated")["class_names"]  # the server resolves them
    Select(label).select_by_visible_text(f"{names[1]} (1)" if names else "label 1")  # by class name where recorded
    params = {"model": "vqvae", "prior": "gated", "label": "1", "n": "4", "temperature": "0.9"}
    grid, seed_field = page.find_element(By.ID, "sample-grid"), form.find_element(By.NAME, "seed")

    run_sample(page, n="4", temperature="0.9", seed="1234")  # a typed seed: the same grid on every press
    first = image_pixels(page, grid)
    assert page.find_element(By.ID, "sample-seed").text == "1234" and "(random)" not in page.find_element(By.ID, "sample-info").text
    expected = httpx.get(server_url + "/sample", params={**params, "seed": "1234"}, timeout=60).content
    assert np.array_equal(first, png_pixels(expected))
    curl = text(page, "#sample pre.curl")
    assert "seed=1234" in curl and "label=1" in curl and "prior=gated" in curl
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    settled(page, "#sample")
    assert np.array_equal(image_pixels(page, grid), first) and seed_field.get_attribute("value") == "1234"
    assert not page.find_element(By.ID, "sample-keep").is_displayed()

    seeds = []
    for _ in range(2):  # no seed: a new one on each press, shown under the grid and not written into the field
        run_sample(page, seed="")
        seeds.append(page.find_element(By.ID, "sample-seed").text)
        assert seeds[-1].isdigit() and 0 <= int(seeds[-1]) < 2**63 and seed_field.get_attribute("value") == ""
        assert "(random)" in page.find_element(By.ID, "sample-info").text and "seed=" not in text(page, "#sample pre.curl")
    assert seeds[0] != seeds[1] and "1234" not in seeds
    expected = httpx.get(server_url + "/sample", params={**params, "seed": seeds[1]}, timeout=60).content
    assert np.array_equal(image_pixels(page, grid), png_pixels(expected))

    page.find_element(By.ID, "sample-keep").click()  # "Keep this seed": the shown grid again
    assert seed_field.get_attribute("value") == seeds[1] and f"seed={seeds[1]}" in text(page, "#sample pre.curl")
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    settled(page, "#sample")
    assert page.find_element(By.ID, "sample-seed").text == seeds[1]
    assert np.array_equal(image_pixels(page, grid), png_pixels(expected))


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
    pixels = [png_pixels(base64.b64decode(s)) for s in expected]
    assert all(np.array_equal(image_pixels(page, f), p) for f, p in zip(frames, pixels))
    assert page.find_element(By.ID, "interp-about").text == "vae, lerp: tshirt.png → trouser.png"

    big = page.find_element(By.ID, "interp-frame")
    assert big.get_attribute("src") == frames[0].get_attribute("src")
    page.find_element(By.ID, "interp-slider").send_keys(Keys.END)
    assert big.get_attribute("src") == frames[-1].get_attribute("src")
    assert page.find_element(By.ID, "interp-info").text == "frame 5 of 5 · t = 1"
    page.find_element(By.ID, "interp-slider").send_keys(Keys.LEFT)
    assert "frame 4 of 5 · t = 0.75" == page.find_element(By.ID, "interp-info").text
    assert "-F 'a=@tshirt.png' -F 'b=@trouser.png'" in text(page, "#interpolate pre.curl")

    # the download: the frames side by side, 2 black pixels apart
    link = page.find_element(By.ID, "interp-download")
    assert link.get_attribute("download") == "interpolate-vae-tshirt-trouser-lerp-5.png"
    strip = url_pixels(page, link.get_attribute("href"))
    h, w = pixels[0].shape[:2]
    assert strip.shape == (h, 5 * w + 4 * 2, 4)
    assert all(np.array_equal(strip[:, i * (w + 2):i * (w + 2) + w], p) for i, p in enumerate(pixels))
    assert (strip[:, w:w + 2, :3] == 0).all()


def test_grids_enlarge_and_download(page) -> None:
    """The sample grid, each reconstruction and the interpolation's frame open big in a lightbox (whole pixels)
    with a download link named after what made them; the grid and the strip have their own download links."""
    lightbox = page.find_element(By.ID, "lightbox")
    grid = page.find_element(By.ID, "sample-grid")
    seed = page.find_element(By.ID, "sample-seed").text
    download = page.find_element(By.ID, "sample-download")
    assert download.get_attribute("download") == f"sample-vae-seed{seed}.png"
    assert download.get_attribute("href") == grid.get_attribute("src") and download.get_attribute("href").startswith("blob:")

    def enlarged(button, src: str, name: str) -> None:
        button.click()
        assert lightbox.get_attribute("open") is not None
        img = page.find_element(By.ID, "lightbox-img")
        wait_for(page, lambda d: img.get_attribute("style"), "the enlarged size")
        assert img.get_attribute("src") == src and img.size["width"] > button.size["width"]
        # whole pixels (the tiny models' images fit the window many times over)
        assert page.execute_script("return arguments[0].width % arguments[0].naturalWidth", img) == 0
        link = page.find_element(By.ID, "lightbox-download")
        assert link.get_attribute("download") == name and link.get_attribute("href") == src
        page.find_element(By.ID, "lightbox-close").click()
        assert lightbox.get_attribute("open") is None

    enlarged(page.find_element(By.ID, "sample-zoom"), grid.get_attribute("src"), f"sample-vae-seed{seed}.png")
    recon = page.find_element(By.CSS_SELECTOR, '#recon-results .pair[data-model="vqvae"] .slot.output button.zoom')
    enlarged(recon, recon.find_element(By.TAG_NAME, "img").get_attribute("src"), "reconstruct-vqvae-tshirt.png")
    frame = page.find_element(By.ID, "interp-frame")
    enlarged(page.find_element(By.ID, "interp-zoom"), frame.get_attribute("src"), "interpolate-vae-tshirt-trouser-slerp-8-frame1.png")
    assert page.find_element(By.ID, "interp-download").get_attribute("download") == "interpolate-vae-tshirt-trouser-slerp-8.png"
    page.find_element(By.ID, "sample-zoom").click()
    ActionChains(page).send_keys(Keys.ESCAPE).perform()
    assert lightbox.get_attribute("open") is None


def test_screenshots_at_desktop_and_phone_width(page, tmp_path) -> None:
    """The page as it opens (its results made on load), at both widths; a strip wider than a phone says so."""
    folder = Path(os.environ.get("GENSERVE_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    hint = page.find_element(By.ID, "interp-scroll")
    for name, (width, height) in (("desktop", DESKTOP), ("phone", PHONE)):
        viewport(page, width, height)
        # nothing wider than the screen: the page scrolls only down; the interpolation's 8 frames scroll sideways
        assert page.execute_script("return document.documentElement.scrollWidth") <= width, name
        phone = name == "phone"
        wait_for(page, lambda d, phone=phone: hint.is_displayed() == phone, f"the scroll hint at {name} width")
        if phone:
            strip = page.find_element(By.ID, "interp-strip")
            assert hint.text == "scroll →"
            assert page.execute_script("return arguments[0].scrollWidth > arguments[0].clientWidth", strip)
        page.execute_script("window.scrollTo(0, 0)")
        assert page.save_screenshot(str(folder / f"{name}.png"))
        full = page.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
        (folder / f"{name}-full.png").write_bytes(base64.b64decode(full["data"]))
        with Image.open(folder / f"{name}.png") as shot:
            assert shot.size == (width, height)
    viewport(page, *DESKTOP)


def test_each_card_shows_its_bits_per_dim_table(page) -> None:
    """conftest.py: vae_rgb records an IWAE bound (and its nats); gated (class-conditional) and pixelcnnpp a
    prior's bound, whose nats/image the page derives: bits/dim × 64 dims × ln 2; vae records none, so its card
    has no table. Bits/dim with 4 decimals, nats with 1."""
    open_cards(page)

    def table(name: str) -> list[list[str]]:
        card = page.find_element(By.CSS_SELECTOR, f'#model-cards .card[data-model="{name}"]')
        return [[cell.text for cell in row.find_elements(By.CSS_SELECTOR, "th, td")]
                for row in card.find_elements(By.CSS_SELECTOR, "table.bits tbody tr")]

    assert table("vae_rgb") == [["IWAE-10: −log p(x)", "5.2500", "698.7"]]
    nats = [f"{bits * 64 * math.log(2):.1f}" for bits in (3.25, 3.4, 3.5)]
    assert nats == ["144.2", "150.8", "155.3"]
    # the prior's bound is told each image's class: named as a bound on -log p(x | y), not -log p(x)
    assert table("vqvae") == [["prior gated, class given: −log p(x | y)", "3.2500", nats[0]],
                              ["prior gated, class marginalised: −log p(x)", "3.4000", nats[1]],
                              ["prior pixelcnnpp: −log p(x)", "3.5000", nats[2]]]
    assert table("vae") == []
    vae = page.find_element(By.CSS_SELECTOR, '#model-cards .card[data-model="vae"]')
    assert vae.find_elements(By.CSS_SELECTOR, "table.bits") == []


def test_bits_per_dim_tables_tell_close_rows_apart_and_break_no_word(driver, server_url) -> None:
    """Two bounds that agree to 4 decimals get as many more as tell them apart (the shipped priors' 3.4197 and
    3.4225 already differ at 4); at phone width no header or number is broken mid-word ("bits/di m")."""
    models = httpx.get(server_url + "/models", timeout=60).json()
    vqvae = next(m for m in models if m["name"] == "vqvae")
    gated = next(p for p in vqvae["priors"] if p["name"] == "gated")
    gated["test_bits_per_dim"], gated["test_marginal_bits_per_dim"] = 3.419739, 3.419741
    vqvae["metrics"].update(test_uniform_prior_bits_per_dim=3.7007215, test_uniform_prior_nll_nats=2011.0734)
    load(driver, server_url, models)
    open_cards(driver)
    card = driver.find_element(By.CSS_SELECTOR, '#model-cards .card[data-model="vqvae"]')
    rows = [[c.text for c in r.find_elements(By.CSS_SELECTOR, "th, td")] for r in card.find_elements(By.CSS_SELECTOR, "table.bits tbody tr")]
    assert [r[1] for r in rows] == ["3.700722", "3.419739", "3.419741", "3.500000"]
    # nats/image likewise: the gated rows' 151.7045 and 151.7046 (bits/dim × 64 × ln 2) need 3 decimals
    assert [r[2] for r in rows] == ["2011.073", "151.704", "151.705", "155.265"]

    viewport(driver, *PHONE)
    broken = driver.execute_script("""
        const broken = [];
        for (const cell of document.querySelectorAll("#model-cards table.bits th, #model-cards table.bits td")) {
          const node = cell.firstChild;
          let at = 0;
          for (const word of node.textContent.split(" ")) {
            const range = document.createRange();
            range.setStart(node, at);
            range.setEnd(node, at + word.length);
            if (word && new Set([...range.getClientRects()].map((r) => Math.round(r.top))).size > 1) broken.push(word);
            at += word.length + 1;
          }
        }
        return broken;""")
    assert broken == []
    headers = card.find_elements(By.CSS_SELECTOR, "table.bits thead th")
    assert [h.text for h in headers] == ["bound", "bits/dim", "nats/image"]
    assert len({h.size["height"] for h in headers}) == 1  # one line each
    assert driver.execute_script("return document.documentElement.scrollWidth") <= PHONE[0]
    viewport(driver, *DESKTOP)


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


@pytest.mark.parametrize("path, rendered", [("/docs", ".opblock"), ("/redoc", "[role=menuitem]")])
def test_the_documentation_renders_and_fetches_nothing_from_another_host(driver, server_url, path, rendered) -> None:
    """Swagger UI and ReDoc render from this server's assets; a request for another host (ReDoc's bundle
    asks cdn.redoc.ly for its footer logo) is blocked by the page's Content-Security-Policy."""
    driver.get_log("performance")
    driver.get(server_url + path)
    wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, rendered), f"{path} to render")
    sent, failed, answered = {}, {}, set()
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        params = message.get("params", {})
        if message["method"] == "Network.requestWillBeSent":
            sent[params["requestId"]] = params["request"]["url"]
        elif message["method"] == "Network.loadingFailed":
            failed[params["requestId"]] = params.get("blockedReason")
        elif message["method"] == "Network.responseReceived":
            answered.add(params["requestId"])
    external = {rid: url for rid, url in sent.items() if not url.startswith((server_url, "data:", "blob:"))}
    assert all(failed.get(rid) == "csp" and rid not in answered for rid in external), (external, failed)
    assert any(url.startswith(server_url + "/docs/assets/") for url in sent.values())


def test_a_model_list_that_cannot_be_had_is_said_once_with_a_retry(driver, server_url) -> None:
    """Before the list is in, the forms are off (a press cannot send a request without a model); a failed
    start-up is not retried for ever; the panels say the list is missing (not that no model can sample),
    and Retry loads it once the server answers."""
    script = driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": """
        const fetchFromServer = window.fetch;
        window.modelsCalls = 0;
        window.modelsAnswer = "held";  // held until the test says: "failed", then "server"
        window.fetch = async (resource, init) => {
          if (new URL(String(resource), location.href).pathname !== "/models") return fetchFromServer(resource, init);
          window.modelsCalls += 1;
          while (window.modelsAnswer === "held") await new Promise((resolve) => setTimeout(resolve, 50));
          if (window.modelsAnswer === "server") return fetchFromServer(resource, init);
          return new Response(JSON.stringify({ detail: "the service is not ready (start-up failed)" }),
                              { status: 503, headers: { "Content-Type": "application/json", "Retry-After": "1" } });
        };"""})["identifier"]
    try:
        viewport(driver, *DESKTOP)
        driver.get(server_url + "/")
        wait_for(driver, lambda d: d.execute_script("return window.modelsCalls") == 1, "the page to ask for the models")
        for form in ("sample-form", "interp-form"):
            assert not driver.find_element(By.CSS_SELECTOR, f"#{form} button[type=submit]").is_enabled()
        driver.execute_script("window.modelsAnswer = 'failed'")
        wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#models .error button.retry"), "the Retry button")
        assert "start-up failed" in driver.find_element(By.CSS_SELECTOR, "#models .error").text
        assert driver.find_element(By.ID, "sample-none").text == "The model list could not be loaded: see Models below."
        calls = driver.execute_script("return window.modelsCalls")
        time.sleep(1.5)  # a retrying page would have asked again by now (it waits 1 s)
        assert driver.execute_script("return window.modelsCalls") == calls == 1
        driver.execute_script("window.modelsAnswer = 'server'")
        driver.find_element(By.CSS_SELECTOR, "#models .error button.retry").click()
        count = len(httpx.get(server_url + "/models", timeout=60).json())
        wait_for(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#model-cards .card")) == count, "model cards")
        for panel in PANELS:
            settled(driver, panel)
        assert driver.find_element(By.ID, "sample-none").get_attribute("hidden")
        assert driver.find_element(By.CSS_SELECTOR, "#sample-form button[type=submit]").is_enabled()
    finally:
        driver.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument", {"identifier": script})
