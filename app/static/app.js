// The try-it page (GET /): one ES module, no dependencies, nothing from another host.
// Every panel calls the API with fetch, shows a progress bar while the request runs, shows the API's
// {"detail": ...} as a readable message when it fails, and shows the same request as a curl command.
// Panels mark their state in data-state (idle | busy | done | error), which tests wait on.

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
const STATUS_WORDS = {
  400: "unusable image", 404: "not found", 408: "upload too slow", 413: "too large",
  422: "invalid parameter", 500: "server error", 503: "busy or starting, try again", 504: "timed out",
};

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

const controllers = new WeakMap();  // panel -> the AbortController of its running request

/** Run `work(signal)` for `panel`: progress bar, data-state, error message; a new run aborts the last. */
async function track(panel, work) {
  controllers.get(panel)?.abort();
  const controller = new AbortController();
  controllers.set(panel, controller);
  const busy = $(":scope > .busy", panel), error = $(":scope > .error", panel);
  panel.dataset.state = "busy";
  panel.setAttribute("aria-busy", "true");
  busy.hidden = false;
  error.hidden = true;
  try {
    await work(controller.signal);
    if (controllers.get(panel) === controller) panel.dataset.state = "done";
  } catch (err) {
    if (err.name === "AbortError" || controllers.get(panel) !== controller) return;
    error.textContent = err instanceof ApiError ? err.message : `Something went wrong in this page: ${err.message}`;
    error.hidden = false;
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

function showCurl(panel, lines) {
  const pre = $(":scope > pre.curl", panel);
  pre.textContent = lines.join("\n");
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

const shape = (s) => s.join("×");
const channels = (m) => (m.image_shape[0] === 1 ? "grey" : "RGB");

/** The prior /sample would use for `name` ("" is the default), or null for a VAE. */
function priorOf(model, name) {
  if (model.kind !== "vqvae") return null;
  return (model.priors ?? []).find((p) => (name ? p.name === name : p.default)) ?? null;
}

/** The card's bits/dim table, one row per test NLL bound recorded (as training/card.py's table), or null.
 * A class-conditional prior's bits/dim is told each image's class: a bound on -log p(x|y), not -log p(x). */
function bitsTable(model) {
  const m = model.metrics ?? {}, rows = [];
  const row = (bound, bits, nats) => rows.push(el("tr", {},
    el("th", { scope: "row" }, bound), el("td", {}, fmt(bits)), el("td", {}, typeof nats === "number" ? fmt(nats) : "–")));
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
  return el("table", { class: "bits" },
    el("caption", {}, "Test NLL bound in bits/dim (lower is better)"),
    el("thead", {}, el("tr", {}, el("th", { scope: "col" }, "bound"), el("th", { scope: "col" }, "bits/dim"),
      el("th", { scope: "col" }, "nats/image"))),
    el("tbody", {}, rows));
}

function card(model) {
  const m = model.metrics ?? {};
  const rows = [];
  const row = (term, ...value) => rows.push(el("dt", {}, term), el("dd", {}, ...value));
  row("Data set", model.dataset || "unknown");
  row("Images", `${shape(model.image_shape)} (${channels(model)})`);
  if (model.kind === "vae") {
    const how = [model.arch && `${model.arch} encoder`, model.decoder && `${model.decoder} decoder`, model.likelihood].filter(Boolean);
    row("Latent", `z of ${shape(model.latent_shape)} dims`, how.length ? ` (${how.join(", ")})` : "");
  } else {
    row("Codes", `${shape(model.code_shape)} grid, K = ${model.codebook_size}`, ` (${model.likelihood})`);
  }
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
  return el("article", { class: "card", "data-model": model.name },
    el("h3", {}, model.name, " ", el("span", { class: "badge" }, model.kind === "vae" ? "VAE" : "VQ-VAE")),
    el("dl", {}, rows),
    bitsTable(model),
    all.length ? el("details", {}, el("summary", {}, "all metrics"), el("table", {}, el("tbody", {}, all))) : "",
    el("button", { type: "button", class: "secondary", onclick: () => useModel(model.name) }, "Use for sample and interpolate"));
}

function useModel(name) {
  for (const form of [sampleForm, interpForm]) {
    form.elements.model.value = name;
    form.elements.model.dispatchEvent(new Event("change", { bubbles: true }));
  }
  $("#sample").scrollIntoView({ behavior: "smooth" });
}

async function loadModels() {
  const panel = $("#models");
  showCurl(panel, [`curl -sS ${quote(endpoint("models"))}`]);
  await track(panel, async (signal) => {
    for (;;) {
      try {
        models = await (await api("models", { signal })).json();
        break;
      } catch (err) {
        if (!(err instanceof ApiError) || err.status !== 503) throw err;
        $(":scope > .error", panel).textContent = `The service is starting; retrying… (${err.message})`;
        $(":scope > .error", panel).hidden = false;
        await new Promise((resolve) => setTimeout(resolve, 1000));
      }
    }
    $(":scope > .error", panel).hidden = true;
    $("#model-cards").replaceChildren(...(models.length ? models.map(card) : [el("p", {}, "No models are loaded.")]));
  });
  for (const form of [sampleForm, interpForm]) {
    const options = models.map((m) => el("option", { value: m.name }, `${m.name} (${m.kind === "vae" ? "VAE" : "VQ-VAE"})`));
    form.elements.model.replaceChildren(...options);
  }
  updateSampleControls();
  sampleCurl();
  interpCurl();
  reconstructCells();
}

// ---------------------------------------------------------------- image pickers

/** A drop zone, a file input and the bundled images in `root`; calls onPick(file) with a File.
 * state.auto: the file was chosen by the page (state.bundled), not by the user, so the page may change it. */
function picker(root, onPick) {
  root.append($("#picker").content.cloneNode(true));
  const input = $("input[type=file]", root), drop = $(".drop", root), thumb = $(".thumb", root);
  const state = { file: null, auto: true, wanted: null };
  const pick = (file, auto = false) => {
    if (!file) return;
    state.file = file;
    state.auto = auto;
    if (thumb.src) URL.revokeObjectURL(thumb.src);
    thumb.src = URL.createObjectURL(file);
    thumb.alt = file.name;
    thumb.hidden = false;
    for (const b of root.querySelectorAll(".bundled button")) b.setAttribute("aria-pressed", String(b.dataset.file === file.name));
    onPick(file);
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
    pick(new File([blob], `${sample.name}.png`, { type: "image/png" }), auto);
  };
  $(".bundled", root).append(...SAMPLES.map((s) => el("button", {
    type: "button", title: s.title, "data-file": `${s.name}.png`, "aria-pressed": "false", onclick: () => bundled(s),
  }, el("img", { src: `static/samples/${s.name}.png`, alt: s.title }))));
  state.bundled = (name) => bundled(SAMPLES.find((s) => s.name === name), true);
  return state;
}

/** The upload as the model sees it (app/imaging.py): alpha over black, centre crop, resize, luma for grey. */
async function modelView(file, [c, h, w]) {
  const canvas = el("canvas", { width: w, height: h, class: "pixels", "aria-label": `input at ${h}×${w}` });
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, w, h);
  let bitmap;
  try {
    bitmap = await createImageBitmap(file);  // applies the EXIF orientation, as the server does
  } catch {
    return el("p", { class: "note" }, "Your browser cannot preview this file; the server may still read it.");
  }
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

// ---------------------------------------------------------------- reconstruct

let reconFile = null;

function reconstructCells() {
  $("#recon-results").replaceChildren(...models.map((m) => el("article", { class: "pair", "data-model": m.name, "data-state": "idle" },
    el("h3", {}, m.name, " ", el("small", {}, `${shape(m.image_shape)} ${channels(m)}`)),
    el("progress", { class: "busy", "aria-label": "working", hidden: true }),
    el("p", { class: "error", role: "alert", hidden: true }),
    el("div", { class: "images" },
      el("figure", {}, el("div", { class: "slot input" }), el("figcaption", {}, `input ${m.image_shape[1]}×${m.image_shape[2]}`)),
      el("figure", {}, el("div", { class: "slot output" }),
        el("figcaption", {}, m.decoder === "autoregressive" ? "reconstruction (pixels drawn)" : "reconstruction"))))));
  reconCurl();
  if (reconFile) reconstructAll(reconFile);
}

function reconCurl() {
  const file = fileName(reconFile);
  showCurl($("#reconstruct"), models.map((m) =>
    `curl -sS -F ${quote(`file=@${file}`)} -o ${quote(`${m.name}.png`)} ${quote(endpoint("reconstruct", { model: m.name }))}`));
}

function reconstructAll(file) {
  reconFile = file;
  reconCurl();
  for (const m of models) {
    const cell = $(`.pair[data-model="${CSS.escape(m.name)}"]`, $("#recon-results"));
    modelView(file, m.image_shape).then((view) => $(".slot.input", cell).replaceChildren(view));
    $(".slot.output", cell).replaceChildren();
    track(cell, async (signal) => {
      const body = new FormData();
      body.append("file", file, file.name);
      const blob = await (await api(endpoint("reconstruct", { model: m.name }), { method: "POST", body, signal })).blob();
      $(".slot.output", cell).replaceChildren(await loadedImage(URL.createObjectURL(blob), `reconstruction by ${m.name}`));
    });
  }
}

/** An <img> that has finished decoding `src`. */
async function loadedImage(src, alt) {
  const img = el("img", { src, alt, class: "pixels" });
  await img.decode();
  return img;
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
  showCurl($("#sample"), [`curl -sS -D - -o grid.png ${quote(endpoint("sample", sampleParams()))}`]);
}

function newSeed() {  // 63 random bits, as the server's seeds
  const [hi, lo] = crypto.getRandomValues(new Uint32Array(2));
  return ((BigInt(hi & 0x7fffffff) << 32n) | BigInt(lo)).toString();
}

async function sample() {
  const panel = $("#sample");
  sampleCurl();
  await track(panel, async (signal) => {
    const started = performance.now();
    const response = await api(endpoint("sample", sampleParams()), { signal });
    const blob = await response.blob();
    const seed = response.headers.get("X-Seed"), prior = response.headers.get("X-Prior");
    const img = $("#sample-grid");
    if (img.src) URL.revokeObjectURL(img.src);
    img.src = URL.createObjectURL(blob);
    await img.decode();
    sampleForm.elements.seed.value = seed;  // Sample again: the same grid
    sampleCurl();
    const n = sampleParams().n || "16";
    $("#sample-info").replaceChildren("seed ", el("output", { id: "sample-seed" }, seed),
      prior ? ` · prior ${prior}` : "", ` · ${n} image${n === "1" ? "" : "s"} · ${Math.round(performance.now() - started)} ms`);
    $(".result", panel).hidden = false;
  });
}

sampleForm.addEventListener("submit", (e) => { e.preventDefault(); sample(); });
sampleForm.elements["new-seed"].addEventListener("click", () => { sampleForm.elements.seed.value = newSeed(); sample(); });
sampleForm.addEventListener("change", () => { updateSampleControls(); sampleCurl(); });
sampleForm.addEventListener("input", sampleCurl);

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
  showCurl($("#interpolate"), [`curl -sS -F ${quote(`a=@${a}`)} -F ${quote(`b=@${b}`)} -o strip.png ${quote(url)}`]);
}

/** Ends the user has not picked follow the model: grey test images for a grey model, colour ones for RGB. */
function defaultEnds() {
  const model = models.find((m) => m.name === interpForm.elements.model.value);
  const names = DEFAULT_ENDS[model?.image_shape[0] === 3 ? 3 : 1];
  for (const [end, name] of [[ends.a, names[0]], [ends.b, names[1]]]) {
    if (end.auto && (end.wanted ?? end.file?.name.replace(/\.png$/, "")) !== name) end.bundled(name);
  }
}

function showFrame(i) {
  const frames = $("#interp-strip").children;
  const n = frames.length;
  for (const [j, frame] of Array.from(frames).entries()) frame.classList.toggle("current", j === i);
  $("#interp-frame").src = frames[i].src;
  $("#interp-info").textContent = `frame ${i + 1} of ${n} · t = ${fmt(n > 1 ? i / (n - 1) : 0)}`;
}

async function interpolate() {
  const panel = $("#interpolate");
  interpCurl();
  await track(panel, async (signal) => {
    if (!ends.a.file || !ends.b.file) throw new ApiError(0, "Pick both images, a and b, first.");
    const body = new FormData();
    body.append("a", ends.a.file, ends.a.file.name);
    body.append("b", ends.b.file, ends.b.file.name);
    const slider = $("#interp-slider");
    const request = { method: "POST", body, accept: "application/json", signal };
    const { images } = await (await api(endpoint("interpolate", interpParams()), request)).json();
    const frames = images.map((b64, i) => el("img", {
      src: `data:image/png;base64,${b64}`, alt: `frame ${i + 1}`, class: "pixels", onclick: () => { slider.value = i; showFrame(i); },
    }));
    await Promise.all(frames.map((f) => f.decode()));
    $("#interp-strip").replaceChildren(...frames);
    slider.max = String(frames.length - 1);
    slider.value = "0";
    showFrame(0);
    $(".result", panel).hidden = false;
  });
}

interpForm.addEventListener("submit", (e) => { e.preventDefault(); interpolate(); });
interpForm.addEventListener("input", interpCurl);
interpForm.addEventListener("change", () => { defaultEnds(); interpCurl(); });
$("#interp-slider").addEventListener("input", (e) => showFrame(Number(e.target.value)));

// ---------------------------------------------------------------- start

picker($("#recon-picker"), reconstructAll);
ends.a = picker($("#interp-a"), interpCurl);
ends.b = picker($("#interp-b"), interpCurl);
loadModels().then(defaultEnds);
