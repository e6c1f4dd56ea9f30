// The try-it page (GET /): one ES module, no dependencies, nothing from another host.
// It opens on results: once the model list is in, it reconstructs a bundled image with every model that
// can, samples a grid, interpolates between two bundled images and scores a bundled image, without a click. Every panel calls the
// API with fetch, shows a progress bar while the request runs, shows the API's {"detail": ...} as one
// readable message when it fails (and marks the result it would have replaced as out of date, or clears
// it), and shows the same request as a curl command. A model is offered only for what its `operations`
// (GET /models) list; a server that sends none is taken to offer them all.
// Panels and reconstruction cells mark their state in data-state (idle | busy | done | error), which tests wait on.

const SAMPLES = [  // bundled images (app/static/samples/): test-split images, for grey and for colour models
  { name: "tshirt", title: "T-shirt/top (Fashion-MNIST, 28×28 grey)", channels: 1 },
  { name: "trouser", title: "Trouser (Fashion-MNIST, 28×28 grey)", channels: 1 },
  { name: "sneaker", title: "Sneaker (Fashion-MNIST, 28×28 grey)", channels: 1 },
  { name: "bag", title: "Bag (Fashion-MNIST, 28×28 grey)", channels: 1 },
  { name: "car", title: "Automobile (CIFAR-10, 32×32 colour)", channels: 3 },
  { name: "cat", title: "Cat (CIFAR-10, 32×32 colour)", channels: 3 },
  { name: "ship", title: "Ship (CIFAR-10, 32×32 colour)", channels: 3 },
  { name: "horse", title: "Horse (CIFAR-10, 32×32 colour)", channels: 3 },
];
const DEFAULT_ENDS = { 1: ["tshirt", "trouser"], 3: ["car", "horse"] };  // interpolation ends by the model's channels
const DEFAULT_RECON = { 1: "tshirt", 3: "car" };  // the image reconstructed on load, by most models' channels
const OPERATIONS = ["reconstruct", "encode", "decode", "interpolate", "sample", "score"];
const STATUS_WORDS = {
  400: "unusable image", 404: "not found", 408: "upload too slow", 413: "too large",
  422: "invalid parameter", 500: "server error", 503: "busy or starting, try again", 504: "timed out",
};
const UPLOAD_STATUSES = new Set([400, 408, 413, 415]);  // the upload itself is at fault: the same for every model

const $ = (selector, root = document) => root.querySelector(selector);

/** An element with attributes (on* are listeners) and children (strings become text, never HTML). */
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  node.append(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
  return node;
}

/** What `model` offers: its `operations`, or all of them from a server that does not say. */
const can = (model, operation) => (Array.isArray(model?.operations) ? model.operations : OPERATIONS).includes(operation);

/** A safe piece of a download's file name. */
const slug = (s) => String(s).replace(/\.[a-z]+$/i, "").replace(/[^\w+-]+/g, "_");

// ---------------------------------------------------------------- requests and errors

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

/** fetch that throws ApiError with the API's detail in words for anything but a 2xx. */
async function api(path, { method = "GET", body, accept, signal } = {}) {
  let response;
  try {
    response = await fetch(path, { method, body, signal, headers: accept ? { Accept: accept } : {} });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, `Could not reach the service (${err.message}). Is it running?`);
  }
  if (!response.ok) throw new ApiError(response.status, await describeError(response));
  return response;
}

/** "temperature: Input should be ... (HTTP 422, invalid parameter)" from an error response. */
async function describeError(response) {
  const status = `HTTP ${response.status}${STATUS_WORDS[response.status] ? `, ${STATUS_WORDS[response.status]}` : ""}`;
  const text = await response.text();
  let body;
  try {
    body = JSON.parse(text);
  } catch {
    return `${text.trim().slice(0, 300) || response.statusText || "No details."} (${status})`;
  }
  let detail = body?.detail;
  if (Array.isArray(detail)) {  // FastAPI's validation errors: [{loc: ["query", "n"], msg}, ...]
    detail = detail.map((e) => {
      const where = (e.loc ?? []).filter((part) => part !== "query" && part !== "body").join(".");
      return where ? `${where}: ${e.msg}` : e.msg;
    }).join("; ");
  } else if (typeof detail !== "string") {
    detail = JSON.stringify(detail ?? body);
  }
  const id = body?.request_id ? `; request id ${body.request_id}` : "";
  return `${detail} (${status}${id})`;
}

const describe = (err) => (err instanceof ApiError ? err.message : `Something went wrong in this page: ${err.message}`);

const controllers = new WeakMap();  // panel -> the AbortController of its running request

/** Run `work(signal)` for `panel`: progress bar, data-state, error message; a new run aborts the last.
 * A failure marks the panel's .result, if shown, as out of date (data-stale) until a run succeeds. */
async function track(panel, work) {
  controllers.get(panel)?.abort();
  const controller = new AbortController();
  controllers.set(panel, controller);
  const busy = $(".busy", panel), error = $(".error", panel), result = $(".result", panel);
  panel.dataset.state = "busy";
  panel.setAttribute("aria-busy", "true");
  busy.hidden = false;
  error.hidden = true;
  try {
    await work(controller.signal);
    if (controllers.get(panel) === controller) {
      panel.dataset.state = "done";
      if (result) delete result.dataset.stale;
    }
  } catch (err) {
    if (err.name === "AbortError" || controllers.get(panel) !== controller) return;
    error.textContent = describe(err);
    error.hidden = false;
    if (result && !result.hidden) result.dataset.stale = "true";
    panel.dataset.state = "error";
    if (!(err instanceof ApiError)) console.error(err);
  } finally {
    if (controllers.get(panel) === controller) {
      busy.hidden = true;
      panel.removeAttribute("aria-busy");
    }
  }
}

// ---------------------------------------------------------------- curl commands

const quote = (s) => `'${String(s).replaceAll("'", "'\\''")}'`;
const endpoint = (path, params = {}) => {
  const url = new URL(path, document.baseURI);
  for (const [key, value] of Object.entries(params)) if (value !== "" && value != null) url.searchParams.set(key, value);
  return url.href;
};
const fileName = (file) => (file?.name || "image.png").replace(/[^\w.+-]/g, "_");

/** A curl line that downloads the bundled images among `files` into the working directory, so the
 * commands after it run as shown wherever they are pasted; none for the user's own files. */
function fetchBundled(...files) {
  const urls = [...new Set(files.filter((f) => f?.bundled).map((f) => endpoint(`static/samples/${f.name}`)))];
  return urls.length ? [`curl -fsS ${urls.map((u) => `-O ${quote(u)}`).join(" ")}`] : [];
}

function showCurl(panel, lines) {
  $(":scope > pre.curl", panel).textContent = lines.join("\n");
}

// ---------------------------------------------------------------- enlarging and downloading

const lightbox = $("#lightbox");

/** Show `src` as big as the window allows (in whole pixels unless that loses more than a sixth), with a
 * download link named `filename`. */
async function enlarge(src, caption, filename) {
  const img = $("#lightbox-img");
  img.src = src;
  img.alt = caption;
  $("#lightbox-caption").textContent = caption;
  Object.assign($("#lightbox-download"), { href: src, download: filename });
  if (!lightbox.open) lightbox.showModal();
  await img.decode().catch(() => {});
  const room = Math.min(window.innerWidth - 48, (window.innerHeight - 120) * (img.naturalWidth / img.naturalHeight));
  const whole = Math.floor(room / img.naturalWidth) * img.naturalWidth;
  img.style.width = `${Math.max(img.naturalWidth, whole >= room * (5 / 6) ? whole : Math.floor(room))}px`;
}

$("#lightbox-close").addEventListener("click", () => lightbox.close());
lightbox.addEventListener("click", (e) => { if (e.target === lightbox) lightbox.close(); });  // the backdrop

/** `img` in a button that enlarges it. */
function zoomable(img, caption, filename) {
  return el("button", { type: "button", class: "zoom", title: "Enlarge", onclick: () => enlarge(img.src, caption, filename) }, img);
}

// ---------------------------------------------------------------- the model list

let models = [];
const MAIN_METRICS = [  // shown on the card (bits/dim in its own table); the rest under "all metrics"
  ["test_neg_elbo", "−ELBO", " nats"],
  ["test_iwae_nll", "IWAE NLL", " nats"],
  ["test_psnr_db", "PSNR", " dB"],
  ["test_mse", "MSE", ""],
  ["test_perplexity", "code perplexity", ""],
];

function fmt(value) {
  if (typeof value === "number") {
    if (Number.isInteger(value)) return String(value);
    return Math.abs(value) >= 100 ? value.toFixed(1) : String(Number(value.toPrecision(4)));
  }
  if (Array.isArray(value)) return value.map(fmt).join("×");
  return typeof value === "string" ? value : JSON.stringify(value);
}

/** Decimals for a column of numbers: `fewest`, or more (up to `most`) where fewer would print two different
 * values the same (3.41974 and 3.41971 at 4 decimals). */
function decimals(values, fewest, most) {
  for (let d = fewest; d < most; d++) {
    const printed = new Map();  // text -> the value printed as it
    const clash = values.some((v) => {
      const text = v.toFixed(d), before = printed.get(text);
      printed.set(text, v);
      return before !== undefined && before !== v;
    });
    if (!clash) return d;
  }
  return most;
}

const shape = (s) => s.join("×");
const channels = (m) => (m.image_shape[0] === 1 ? "grey" : "RGB");
const dims = (m) => m.image_shape.reduce((a, b) => a * b, 1);
const kindName = (m) => (m.kind === "vae" ? "VAE" : "VQ-VAE");

/** The prior /sample would use for `name` ("" is the default), or null for a VAE. */
function priorOf(model, name) {
  if (model.kind !== "vqvae") return null;
  return (model.priors ?? []).find((p) => (name ? p.name === name : p.default)) ?? null;
}

/** The card's bits/dim table, one row per test NLL bound recorded (as training/card.py's table), or null.
 * A class-conditional prior's bits/dim is told each image's class: a bound on -log p(x|y), not -log p(x).
 * nats/image is the recorded value where the model's file has one, else bits/dim × D × ln 2 (D = C·H·W: the
 * definition of bits/dim), so the priors' rows, whose nats /models does not carry, show theirs too. */
function bitsTable(model) {
  const m = model.metrics ?? {}, rows = [];
  const row = (bound, bits, nats) => rows.push({ bound, bits, nats: typeof nats === "number" ? nats : bits * dims(model) * Math.LN2 });
  if (model.kind === "vae" && typeof m.test_bits_per_dim === "number") {
    row(`${m.iwae_k ? `IWAE-${m.iwae_k}` : "bound"}: −log p(x)`, m.test_bits_per_dim, m.test_nll_nats);
  }
  if (model.kind === "vqvae") {
    if (typeof m.test_uniform_prior_bits_per_dim === "number") {
      row("uniform prior (log K per code): −log p(x)", m.test_uniform_prior_bits_per_dim, m.test_uniform_prior_nll_nats);
    }
    for (const p of model.priors ?? []) {
      if (typeof p.test_bits_per_dim !== "number") continue;
      row(p.num_classes ? `prior ${p.name}, class given: −log p(x | y)` : `prior ${p.name}: −log p(x)`, p.test_bits_per_dim);
      if (p.num_classes && typeof p.test_marginal_bits_per_dim === "number") {
        row(`prior ${p.name}, class marginalised: −log p(x)`, p.test_marginal_bits_per_dim);
      }
    }
  }
  if (!rows.length) return null;
  const bitsPlaces = decimals(rows.map((r) => r.bits), 4, 7), natsPlaces = decimals(rows.map((r) => r.nats), 1, 4);
  return el("table", { class: "bits" },
    el("caption", {}, "Test NLL bound (lower is better)"),
    el("thead", {}, el("tr", {}, el("th", { scope: "col" }, "bound"), el("th", { scope: "col" }, "bits/dim"),
      el("th", { scope: "col" }, "nats/image"))),
    el("tbody", {}, rows.map((r) => el("tr", {},
      el("th", { scope: "row" }, r.bound), el("td", {}, r.bits.toFixed(bitsPlaces)), el("td", {}, r.nats.toFixed(natsPlaces))))));
}

function card(model) {
  const m = model.metrics ?? {};
  const rows = [];
  const row = (term, ...value) => rows.push(el("dt", {}, term), el("dd", {}, ...value));
  row("Data set", model.dataset || "unknown");
  row("Images", `${shape(model.image_shape)} (${channels(model)})`);
  if (model.kind === "vae") {
    const how = [model.arch && `${model.arch} encoder`, model.decoder && `${model.decoder} decoder`, model.likelihood].filter(Boolean);
    row("Latent", model.latent_shape ? `z of ${shape(model.latent_shape)} dims` : "none (its decoder is fed z = 0: a baseline that only samples)",
      how.length ? ` (${how.join(", ")})` : "");
  } else {
    row("Codes", `${shape(model.code_shape)} grid, K = ${model.codebook_size}`, ` (${model.likelihood})`);
  }
  row("Offers", OPERATIONS.filter((op) => can(model, op)).join(", ") || "nothing");
  row("Device", model.device);
  const shown = MAIN_METRICS.filter(([key]) => typeof m[key] === "number");
  row("Test", shown.length ? shown.map(([key, label, unit]) => `${label} ${fmt(m[key])}${unit}`).join(" · ") : "no metrics recorded");
  row("Classes", model.class_names?.length ? model.class_names.join(", ") : "none recorded");
  if (model.kind === "vqvae") {
    const priors = (model.priors ?? []).map((p) => el("li", {},
      el("b", {}, p.name), p.default ? " (default)" : "",
      p.test_bits_per_code != null ? ` · ${fmt(p.test_bits_per_code)} bits/code` : "",
      p.num_classes ? ` · ${p.num_classes} classes` : " · unconditional",
      p.class_names_conflict ? el("span", { class: "note" }, ` (class names: ${p.class_names_conflict})`) : ""));
    row("Priors", priors.length ? el("ul", { class: "plain" }, priors) : "none loaded: this model cannot sample");
    for (const r of model.rejected_priors ?? []) row("Refused", `${r.file}: ${r.reason}`);
  }
  const all = Object.entries(m).map(([key, value]) => el("tr", {}, el("th", { scope: "row" }, key), el("td", {}, fmt(value))));
  const uses = ["sample", "interpolate"].filter((op) => can(model, op));
  const about = model.kind === "vae"
    ? [model.arch, model.decoder === "autoregressive" ? "autoregressive decoder" : null].filter(Boolean).join(", ")
    : `${model.priors?.length ?? 0} prior${model.priors?.length === 1 ? "" : "s"}`;
  return el("details", { class: "card", "data-model": model.name },
    el("summary", {},
      el("h3", {}, model.name, " ", el("span", { class: "badge" }, kindName(model))),
      el("span", { class: "line" }, [model.dataset || "unknown data", `${shape(model.image_shape.slice(1))} ${channels(model)}`, about]
        .filter(Boolean).join(" · "))),
    el("div", { class: "body" },
      el("dl", {}, rows),
      bitsTable(model),
      all.length ? el("details", { class: "all" }, el("summary", {}, "all metrics"), el("table", {}, el("tbody", {}, all))) : "",
      uses.length ? el("button", { type: "button", class: "secondary", onclick: () => useModel(model.name) },
        `Use for ${uses.join(" and ")}`) : ""));
}

function useModel(name) {
  let first = null;
  for (const form of [sampleForm, interpForm]) {
    if (![...form.elements.model.options].some((o) => o.value === name)) continue;
    form.elements.model.value = name;
    form.elements.model.dispatchEvent(new Event("change", { bubbles: true }));
    first ??= form;
  }
  first?.closest(".panel").scrollIntoView({ behavior: "smooth" });
}

const STARTING_TRIES = 180;  // a start-up takes seconds; after 3 minutes of 503s the page stops asking

/** GET /models into `models`; true once it is in. A 503 while the service starts is retried each second; a
 * failed start-up, any other error, or a start that never ends is shown in the Models panel with a Retry button. */
async function loadModels() {
  const panel = $("#models"), error = $(".error", panel);
  showCurl(panel, [`curl -fsS ${quote(endpoint("models"))}`]);
  let loaded = false;
  await track(panel, async (signal) => {
    for (let tries = 1; ; tries++) {
      try {
        models = await (await api("models", { signal })).json();
        break;
      } catch (err) {
        const failed = err instanceof ApiError && /start-up failed/.test(err.message);
        if (!(err instanceof ApiError) || err.status !== 503 || failed || tries >= STARTING_TRIES) throw err;
        error.textContent = `The service is starting; retrying… (${err.message})`;
        error.hidden = false;
        await new Promise((resolve) => setTimeout(resolve, 1000));
      }
    }
    error.hidden = true;
    loaded = true;
    $("#model-cards").replaceChildren(...(models.length ? models.map(card) : [el("p", {}, "No models are loaded.")]));
  });
  if (!loaded) {
    error.append(" ", el("button", { type: "button", class: "retry", onclick: () => loadModels().then(showOnLoad) }, "Retry"));
  }
  for (const [form, operation] of [[sampleForm, "sample"], [interpForm, "interpolate"]]) {
    const offered = models.filter((m) => can(m, operation));
    form.elements.model.replaceChildren(...offered.map((m) => el("option", { value: m.name }, `${m.name} (${kindName(m)})`)));
    form.hidden = !offered.length;
    for (const control of form.elements) control.disabled = false;  // off until the list was in (index.html)
  }
  for (const [note, form, what] of [[$("#sample-none"), sampleForm, "sample"], [$("#interp-none"), interpForm, "interpolate"]]) {
    note.textContent = loaded ? `No loaded model can ${what}.` : "The model list could not be loaded: see Models below.";
    note.hidden = !form.hidden;
  }
  updateSampleControls();
  sampleCurl();
  interpCurl();
  reconstructCells();
  scoreCells();
}

// ---------------------------------------------------------------- image pickers

/** A drop zone, a file input and the bundled images in `root`; calls onPick(file, preview), preview a promise
 * of the browser's ImageBitmap of the file, or of null where the browser cannot decode it (the server may).
 * state.auto: the file was chosen by the page (state.bundled), not by the user, so the page may change it. */
function picker(root, onPick) {
  root.append($("#picker").content.cloneNode(true));
  const input = $("input[type=file]", root), drop = $(".drop", root), thumb = $(".thumb", root), name = $(".name", root);
  const state = { file: null, auto: true, wanted: null };
  const pick = (file, auto = false, bundledFile = null) => {
    if (!file) return;
    state.file = file;
    state.auto = auto;
    for (const b of root.querySelectorAll(".bundled button")) b.setAttribute("aria-pressed", String(b.dataset.file === bundledFile));
    thumb.hidden = true;  // until it has decoded: never a broken image
    if (thumb.src) URL.revokeObjectURL(thumb.src);
    thumb.removeAttribute("src");
    name.hidden = Boolean(bundledFile);  // a bundled image is marked by its button
    name.textContent = file.name;
    const preview = createImageBitmap(file).catch(() => null);  // applies the EXIF orientation, as the server does
    preview.then(async (bitmap) => {
      if (state.file !== file) return;
      if (!bitmap) {
        name.textContent = `${file.name} (your browser cannot show it)`;
        return;
      }
      thumb.src = URL.createObjectURL(file);
      thumb.alt = file.name;
      if (await thumb.decode().then(() => true, () => false) && state.file === file) thumb.hidden = false;
    });
    onPick(file, preview);
  };
  input.addEventListener("change", () => { state.wanted = null; pick(input.files[0]); });
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    state.wanted = null;
    pick(e.dataTransfer.files[0]);
  });
  const bundled = async (sample, auto = false) => {
    state.wanted = sample.name;
    const response = await fetch(`static/samples/${sample.name}.png`);
    const blob = await response.blob();
    if (state.wanted !== sample.name) return;  // another image was picked while this one loaded
    const file = new File([blob], `${sample.name}.png`, { type: "image/png" });
    file.bundled = true;  // its curl line fetches it first (fetchBundled)
    pick(file, auto, `${sample.name}.png`);
  };
  $(".bundled", root).append(...SAMPLES.map((s) => el("button", {
    type: "button", title: s.title, "data-file": `${s.name}.png`, "aria-pressed": "false", onclick: () => bundled(s),
  }, el("img", { src: `static/samples/${s.name}.png`, alt: s.title }))));
  state.bundled = (name) => bundled(SAMPLES.find((s) => s.name === name), true);  // the page's pick, the page's to change
  return state;
}

/** The upload as the model sees it (app/imaging.py): alpha over black, centre crop, resize, luma for grey. */
function modelView(bitmap, [c, h, w]) {
  const canvas = el("canvas", { width: w, height: h, class: "pixels", "aria-label": `input at ${h}×${w}` });
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, w, h);
  let cw = bitmap.width, ch = bitmap.height;
  if (cw * h > ch * w) cw = Math.max(1, Math.round((ch * w) / h));
  else ch = Math.max(1, Math.round((cw * h) / w));
  ctx.imageSmoothingQuality = "high";
  ctx.drawImage(bitmap, Math.floor((bitmap.width - cw) / 2), Math.floor((bitmap.height - ch) / 2), cw, ch, 0, 0, w, h);
  if (c === 1) {  // ITU-R 601-2 luma, Pillow's convert("L")
    const pixels = ctx.getImageData(0, 0, w, h);
    const d = pixels.data;
    for (let i = 0; i < d.length; i += 4) d[i] = d[i + 1] = d[i + 2] = Math.round((d[i] * 299 + d[i + 1] * 587 + d[i + 2] * 114) / 1000);
    ctx.putImageData(pixels, 0, 0);
  }
  return canvas;
}

/** An <img> that has finished decoding `src`. */
async function loadedImage(src, alt) {
  const img = el("img", { src, alt, class: "pixels" });
  await img.decode();
  return img;
}

// ---------------------------------------------------------------- one upload, every model (reconstruct, score)

/** One cell per model in `results`: its name, the input as it sees it and the output slot (`outputTitle`),
 * and a place for `extra` (the score's numbers). */
function modelCells(results, list, outputTitle, extra = false) {
  results.replaceChildren(...list.map((m) => el("article", { class: "pair", "data-model": m.name, "data-state": "idle" },
    el("h3", {}, el("span", { class: "name" }, m.name), " ", el("small", {}, `${shape(m.image_shape.slice(1))} ${channels(m)}`)),
    el("div", { class: "images" },
      el("div", { class: "slot input", title: "the input as the model sees it" }),
      el("div", { class: "slot output", title: outputTitle(m) })),
    extra ? el("dl", { class: "numbers" }) : null,
    el("p", { class: "error", role: "alert", hidden: true }))));
}

/** "Not shown: a, b, which do not <what>" for the models that lack `operation`, in `note`. */
function skippedNote(note, operation, what) {
  const skipped = models.filter((m) => !can(m, operation)).map((m) => m.name);
  note.textContent = skipped.length > 1 ? `Not shown: ${skipped.join(", ")}, which ${what[1]}.`
    : `Not shown: ${skipped.join(", ")}, which ${what[0]}.`;
  note.hidden = !skipped.length;
}

/** One curl per model; a shell loop over them where every name is a plain word (short at phone width). */
function perModelCurl(panel, path, file, names, ext, params = {}) {
  const upload = quote(`file=@${fileName(file)}`);
  const url = endpoint(path, { model: "MODEL", ...params }).replace("model=MODEL", "model=$m");
  showCurl(panel, [...fetchBundled(file), ...(names.length > 1 && names.every((n) => /^[\w.-]+$/.test(n))
    ? [`for m in ${names.join(" ")}; do`, `  curl -fsS -F ${upload} -o "$m.${ext}" "${url}"`, "done"]
    : names.map((n) => `curl -fsS -F ${upload} -o ${quote(`${n}.${ext}`)} ${quote(endpoint(path, { model: n, ...params }))}`))]);
}

const perModelRuns = new Map();  // panel -> the AbortController of its running per-model run

/** Send `file` to every model with a cell in `panel`'s `results`: `request(model, file, signal)` resolves to a
 * function that fills the model's cell, called only if this run is still the panel's latest. A problem with the
 * file itself (or one that several models share) is said once, under the picker; a model's own problem in its
 * cell. When no model answered, the cells go: nothing from the last image is left under the message. */
async function perModel(panel, results, list, file, preview, request) {
  perModelRuns.get(panel)?.abort();
  const run = new AbortController();
  perModelRuns.set(panel, run);
  const current = () => perModelRuns.get(panel) === run;
  const error = $(":scope > .error", panel);
  const cells = list.map((m) => [m, $(`.pair[data-model="${CSS.escape(m.name)}"]`, results)]);
  panel.dataset.state = "busy";
  panel.setAttribute("aria-busy", "true");
  error.hidden = true;
  results.hidden = false;
  for (const [, cell] of cells) {
    cell.dataset.state = "busy";
    $(".slot.input", cell).replaceChildren();
    $(".slot.output", cell).replaceChildren();
    $(".numbers", cell)?.replaceChildren();
    cell.removeAttribute("title");
    $(".error", cell).hidden = true;
  }
  const bitmap = await preview;
  if (!current()) return;
  const failures = (await Promise.all(cells.map(async ([m, cell]) => {
    if (bitmap) $(".slot.input", cell).replaceChildren(modelView(bitmap, m.image_shape));
    try {
      const fill = await request(m, file, run.signal);
      if (!current()) return null;
      fill(cell);
      cell.dataset.state = "done";
      return null;
    } catch (err) {
      if (err.name === "AbortError" || !current()) return null;
      if (!(err instanceof ApiError)) console.error(err);
      cell.dataset.state = "error";
      return { cell, err, message: describe(err) };
    }
  }))).filter(Boolean);
  if (!current()) return;
  const times = new Map();
  for (const f of failures) times.set(f.message, (times.get(f.message) ?? 0) + 1);
  const once = new Set();
  for (const f of failures) {
    if (UPLOAD_STATUSES.has(f.err.status) || times.get(f.message) > 1) once.add(f.message);
    else Object.assign($(".error", f.cell), { textContent: f.message, hidden: false });
  }
  error.textContent = [...once].join("\n");
  error.hidden = !once.size;
  results.hidden = cells.length > 0 && failures.length === cells.length;
  panel.dataset.state = failures.length ? "error" : "done";
  panel.removeAttribute("aria-busy");
}

/** The upload as a multipart body. */
function uploadBody(file) {
  const body = new FormData();
  body.append("file", file, file.name);
  return body;
}

// ---------------------------------------------------------------- reconstruct

let reconFile = null, reconPreview = null;
const reconModels = () => models.filter((m) => can(m, "reconstruct"));

function reconstructCells() {
  modelCells($("#recon-results"), reconModels(), (m) => (m.decoder === "autoregressive" ? "reconstruction (pixels drawn)" : "reconstruction"));
  skippedNote($("#recon-skipped"), "reconstruct", ["does not reconstruct (it has no latent)", "do not reconstruct (they have no latent)"]);
  reconCurl();
  if (reconFile) reconstructAll(reconFile, reconPreview);
}

function reconCurl() {
  perModelCurl($("#reconstruct"), "reconstruct", reconFile, reconModels().map((m) => m.name), "png");
}

/** Reconstruct `file` with every model that can. */
async function reconstructAll(file, preview) {
  reconFile = file;
  reconPreview = preview;
  reconCurl();
  await perModel($("#reconstruct"), $("#recon-results"), reconModels(), file, preview, async (m, f, signal) => {
    const response = await api(endpoint("reconstruct", { model: m.name }), { method: "POST", body: uploadBody(f), signal });
    const img = await loadedImage(URL.createObjectURL(await response.blob()), `reconstruction by ${m.name}`);
    return (cell) => $(".slot.output", cell).replaceChildren(zoomable(img, `${f.name} reconstructed by ${m.name}`,
      `reconstruct-${slug(m.name)}-${slug(f.name)}.png`));
  });
}

// ---------------------------------------------------------------- score

const SCORE_PARAMS = { k: 100, codec: "webp", map: "true" };  // k = 100: as the stored thresholds were set
let scoreFile = null, scorePreview = null;
const scoreModels = () => models.filter((m) => can(m, "score"));

function scoreCells() {
  modelCells($("#score-results"), scoreModels(), () => "bits per subpixel: black 0, pale yellow 8 or more", true);
  skippedNote($("#score-skipped"), "score", ["cannot score (its likelihood is not a probability of 8-bit images)",
    "cannot score (their likelihood is not a probability of 8-bit images)"]);
  scoreCurl();
  if (scoreFile) scoreAll(scoreFile, scorePreview);
}

function scoreCurl() {
  perModelCurl($("#score"), "score", scoreFile, scoreModels().map((m) => m.name), "json", SCORE_PARAMS);
}

/** Score `file` under every model that can: its bits/dim, the WebP complexity score, the verdict against the
 * threshold stored with the model (where there is one) and the heat map of where the bits go. */
async function scoreAll(file, preview) {
  scoreFile = file;
  scorePreview = preview;
  scoreCurl();
  await perModel($("#score"), $("#score-results"), scoreModels(), file, preview, async (m, f, signal) => {
    const request = { method: "POST", body: uploadBody(f), accept: "application/json", signal };
    const body = await (await api(endpoint("score", { model: m.name, ...SCORE_PARAMS }), request)).json();
    const item = body.items[0];
    const img = await loadedImage(`data:image/png;base64,${item.map_png}`, `heat map under ${m.name}`);
    return (cell) => {
      $(".slot.output", cell).replaceChildren(zoomable(img, `${f.name}: bits per subpixel under ${m.name} (black 0, pale yellow 8)`,
        `score-${slug(m.name)}-${slug(f.name)}.png`));
      const v = item.verdict;
      const rows = [["bits/dim", item.bits_per_dim.toFixed(3)], ["minus WebP", item.complexity_score.webp.toFixed(3)],
        ["verdict", v ? el("span", { class: v.unusual ? "verdict unusual" : "verdict typical", title:
          `${v.score} score ${v.value.toFixed(3)} against the threshold ${v.threshold.toFixed(3)}` }, v.unusual ? "unusual" : "typical")
          : el("span", { class: "note", title: "set one with python -m training threshold" }, "no threshold")]];
      $(".numbers", cell).replaceChildren(...rows.flatMap(([term, value]) => [el("dt", {}, term), el("dd", {}, value)]));
      cell.title = body.bound;
    };
  });
}

// ---------------------------------------------------------------- sample

const sampleForm = $("#sample-form");

function sampleModel() {
  return models.find((m) => m.name === sampleForm.elements.model.value);
}

/** Show the prior and class pickers that apply to the chosen model and prior. */
function updateSampleControls() {
  const f = sampleForm.elements, model = sampleModel();
  const vq = model?.kind === "vqvae";
  $('[data-for="vqvae"]', sampleForm).hidden = !vq;
  if (vq && f.prior.dataset.model !== model.name) {
    f.prior.dataset.model = model.name;
    f.prior.replaceChildren(el("option", { value: "" }, `default (${model.default_prior ?? "none"})`),
      ...(model.priors ?? []).map((p) =>
        el("option", { value: p.name }, `${p.name}${p.num_classes ? `, ${p.num_classes} classes` : ""}`)));
  }
  const prior = vq ? priorOf(model, f.prior.value) : null;
  const conditional = Boolean(prior?.num_classes);
  $('[data-for="conditional"]', sampleForm).hidden = !conditional;
  const key = conditional ? `${model.name}/${prior.name}` : "";
  if (f.label.dataset.key !== key) {
    f.label.dataset.key = key;
    const names = prior?.class_names ?? [];  // the server's names for this prior's labels (its own, or its VQ-VAE's)
    f.label.replaceChildren(el("option", { value: "" }, "any (random)"),
      ...Array.from({ length: prior?.num_classes ?? 0 }, (_, i) =>
        el("option", { value: i }, names[i] ? `${names[i]} (${i})` : `label ${i}`)));
  }
}

function sampleParams() {
  const f = sampleForm.elements, model = sampleModel();
  const params = { model: f.model.value, n: f.n.value.trim(), temperature: f.temperature.value.trim(), seed: f.seed.value.trim() };
  if (model?.kind === "vqvae") params.prior = f.prior.value;
  if (!$('[data-for="conditional"]', sampleForm).hidden) params.label = f.label.value;
  return params;
}

function sampleCurl() {
  showCurl($("#sample"), [`curl -fsS -D - -o grid.png ${quote(endpoint("sample", sampleParams()))}`]);
}

/** Sample with the form's settings. An empty Seed field asks the server for a new seed each time; the grid's
 * caption shows the seed it used (and "Keep this seed" copies it into the field to draw the grid again). */
async function sample() {
  const panel = $("#sample");
  sampleCurl();
  await track(panel, async (signal) => {
    const started = performance.now();
    const params = sampleParams();
    const response = await api(endpoint("sample", params), { signal });
    const blob = await response.blob();
    const seed = response.headers.get("X-Seed"), prior = response.headers.get("X-Prior");
    const img = $("#sample-grid");
    const old = img.src;
    img.src = URL.createObjectURL(blob);
    await img.decode();
    if (old) URL.revokeObjectURL(old);
    const n = params.n || "16", label = params.label ? sampleForm.elements.label.selectedOptions[0]?.text : "";
    $("#sample-info").replaceChildren(params.model, prior ? ` · prior ${prior}` : "", label ? ` · class ${label}` : "",
      " · seed ", el("output", { id: "sample-seed" }, seed), params.seed ? "" : " (random)",
      ` · ${n} image${n === "1" ? "" : "s"} · ${Math.round(performance.now() - started)} ms`);
    const name = `sample-${slug(params.model)}${prior ? `-${slug(prior)}` : ""}${params.label ? `-class${params.label}` : ""}-seed${seed}.png`;
    Object.assign($("#sample-download"), { href: img.src, download: name });
    img.dataset.download = name;
    img.dataset.caption = $("#sample-info").textContent;
    $("#sample-keep").hidden = Boolean(params.seed);
    $("#sample-keep").dataset.seed = seed;
    $(".result", panel).hidden = false;
  });
}

sampleForm.addEventListener("submit", (e) => { e.preventDefault(); sample(); });
sampleForm.addEventListener("change", () => { updateSampleControls(); sampleCurl(); });
sampleForm.addEventListener("input", sampleCurl);
$("#sample-keep").addEventListener("click", (e) => {
  sampleForm.elements.seed.value = e.currentTarget.dataset.seed;
  e.currentTarget.hidden = true;
  sampleCurl();
});
$("#sample-zoom").addEventListener("click", () => {
  const img = $("#sample-grid");
  enlarge(img.src, img.dataset.caption, img.dataset.download);
});

// ---------------------------------------------------------------- interpolate

const interpForm = $("#interp-form");
const ends = {};

function interpParams() {
  const f = interpForm.elements;
  return { model: f.model.value, steps: f.steps.value.trim(), method: f.method.value };
}

function interpCurl() {
  const a = fileName(ends.a?.file), b = fileName(ends.b?.file);
  const url = endpoint("interpolate", interpParams());
  showCurl($("#interpolate"), [...fetchBundled(ends.a?.file, ends.b?.file),
    `curl -fsS -F ${quote(`a=@${a}`)} -F ${quote(`b=@${b}`)} -o strip.png ${quote(url)}`]);
}

/** Ends the user has not picked follow the model: grey test images for a grey model, colour ones for RGB.
 * Resolves once both ends are loaded. */
function defaultEnds() {
  const model = models.find((m) => m.name === interpForm.elements.model.value);
  const names = DEFAULT_ENDS[model?.image_shape[0] === 3 ? 3 : 1];
  return Promise.all([[ends.a, names[0]], [ends.b, names[1]]].map(([end, name]) =>
    (end.auto && (end.wanted ?? end.file?.name.replace(/\.png$/, "")) !== name ? end.bundled(name) : null)));
}

function showFrame(i) {
  const frames = $("#interp-strip").children;
  const n = frames.length;
  for (const [j, frame] of Array.from(frames).entries()) frame.classList.toggle("current", j === i);
  const big = $("#interp-frame");
  big.src = frames[i].src;
  big.dataset.caption = `${$("#interp-about").textContent}, frame ${i + 1} of ${n}`;
  big.dataset.download = `${$("#interp-download").download.replace(/\.png$/, "")}-frame${i + 1}.png`;
  $("#interp-info").textContent = `frame ${i + 1} of ${n} · t = ${fmt(n > 1 ? i / (n - 1) : 0)}`;
}

/** The frames side by side, 2 black pixels apart, as a PNG blob (the download). */
function stripBlob(frames) {
  const w = frames[0].naturalWidth, h = frames[0].naturalHeight, gap = 2;
  const canvas = el("canvas", { width: frames.length * (w + gap) - gap, height: h });
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  frames.forEach((frame, i) => ctx.drawImage(frame, i * (w + gap), 0));
  return new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
}

/** "scroll →" beside a strip wider than its box (at phone width). */
function updateScrollHint() {
  const strip = $("#interp-strip");
  $("#interp-scroll").hidden = strip.scrollWidth <= strip.clientWidth + 1;
}
new ResizeObserver(updateScrollHint).observe($("#interp-strip"));

async function interpolate() {
  const panel = $("#interpolate");
  interpCurl();
  await track(panel, async (signal) => {
    if (!ends.a.file || !ends.b.file) throw new ApiError(0, "Pick both images, a and b, first.");
    const params = interpParams(), a = ends.a.file.name, b = ends.b.file.name;
    const body = new FormData();
    body.append("a", ends.a.file, a);
    body.append("b", ends.b.file, b);
    const slider = $("#interp-slider");
    const request = { method: "POST", body, accept: "application/json", signal };
    const { images } = await (await api(endpoint("interpolate", params), request)).json();
    const frames = images.map((b64, i) => el("img", {
      src: `data:image/png;base64,${b64}`, alt: `frame ${i + 1}`, class: "pixels", onclick: () => { slider.value = i; showFrame(i); },
    }));
    await Promise.all(frames.map((f) => f.decode()));
    const download = $("#interp-download");
    const strip = URL.createObjectURL(await stripBlob(frames));
    if (download.href.startsWith("blob:")) URL.revokeObjectURL(download.href);
    Object.assign(download, {
      href: strip, download: `interpolate-${slug(params.model)}-${slug(a)}-${slug(b)}-${params.method}-${frames.length}.png`,
    });
    $("#interp-about").textContent = `${params.model}, ${params.method}: ${a} → ${b}`;
    $("#interp-strip").replaceChildren(...frames);
    slider.max = String(frames.length - 1);
    slider.value = "0";
    showFrame(0);
    $(".result", panel).hidden = false;
    updateScrollHint();
  });
}

interpForm.addEventListener("submit", (e) => { e.preventDefault(); interpolate(); });
interpForm.addEventListener("input", interpCurl);
interpForm.addEventListener("change", () => { defaultEnds(); interpCurl(); });
$("#interp-slider").addEventListener("input", (e) => showFrame(Number(e.target.value)));
$("#interp-zoom").addEventListener("click", () => {
  const img = $("#interp-frame");
  enlarge(img.src, img.dataset.caption, img.dataset.download);
});

// ---------------------------------------------------------------- start: results before any question

const recon = picker($("#recon-picker"), reconstructAll);
const scorePick = picker($("#score-picker"), scoreAll);
ends.a = picker($("#interp-a"), interpCurl);
ends.b = picker($("#interp-b"), interpCurl);

/** What the page shows without a click, once the model list is in (or has failed). */
async function showOnLoad() {
  const grey = reconModels().filter((m) => m.image_shape[0] === 1).length;
  if (recon.auto && !recon.file && reconModels().length) {
    recon.bundled(DEFAULT_RECON[grey * 2 >= reconModels().length ? 1 : 3]);
  } else if (!reconModels().length) {
    $("#reconstruct").dataset.state = "done";
  }
  const greyScores = scoreModels().filter((m) => m.image_shape[0] === 1).length;
  if (scorePick.auto && !scorePick.file && scoreModels().length) {
    scorePick.bundled(DEFAULT_RECON[greyScores * 2 >= scoreModels().length ? 1 : 3]);
  } else if (!scoreModels().length) {
    $("#score").dataset.state = "done";
  }
  for (const [form, panel, run] of [[sampleForm, $("#sample"), sample], [interpForm, $("#interpolate"), null]]) {
    if (form.hidden) panel.dataset.state = "done";
    else if (run && panel.dataset.state === "idle") run();
  }
  if (!interpForm.hidden) {
    await defaultEnds();
    if ($("#interpolate").dataset.state === "idle") interpolate();  // unless the user has started one
  }
}

for (const form of [sampleForm, interpForm]) for (const control of form.elements) control.disabled = true;  // until the list is in
loadModels().then(showOnLoad);
