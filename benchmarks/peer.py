"""The peer servers of benchmarks/peers.py, serving its workloads through the service's own code.

    python -m benchmarks.peer --port 8001 --weights weights --threads 2 [--parallel N]   # plain
    python -m benchmarks.peer --port 8002 --weights weights --threads 2 --litserve [--fast-queue]

Given a seed or an upload, a peer computes the PNG the service would (only a pass's size may differ,
and with it, in rare pixels, the last bit): sample-vae_conv-16 (GET /sample?model=vae_conv&n=16&seed=S),
sample-pixelcnn-1 (GET /sample?model=vqvae&prior=pixelcnn&n=1&seed=S), reconstruct-vae_conv (POST
/reconstruct?model=vae_conv). plain: FastAPI at the service's routes, no batching, --parallel passes at
once (default 1: on a CPU, passes at once only share the cores). litserve: LitServe 0.2.19 at POST
/predict, max_batch_size=32, batch_timeout=5 ms, one inference worker (--fast-queue: responses over
ZeroMQ); its SIGTERM becomes the KeyboardInterrupt its `run` shuts down on (else its worker, API
server and Manager processes are orphaned), and whatever is left is killed on the way out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import signal
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import torch
from fastapi import FastAPI, File, HTTPException, Query, UploadFile
from fastapi.responses import Response
from PIL import Image
from torch import nn

from app.imaging import ImageError, decode_upload, grid_png
from app.operations import sample_inputs
from benchmarks.harness import ROOT, png_bytes
from models.io import load_model

try:
    import litserve as ls
except ImportError:  # the `bench` extra: only the LitServe peer needs it
    ls = None

WORKLOADS = ("sample-vae_conv-16", "sample-pixelcnn-1", "reconstruct-vae_conv")
SAMPLE_N = {"sample-vae_conv-16": 16, "sample-pixelcnn-1": 1}  # images per /sample request
TEMPERATURE = 1.0  # the service's default for /sample
MAX_PIXELS = 2048 * 2048  # the service's default GENSERVE_MAX_PIXELS
WEIGHT_FILES = {"vae": "vae_conv.safetensors", "vq": "vqvae.safetensors", "prior": "vqvae_pixelcnn.safetensors"}

Inputs = tuple[torch.Tensor, ...]  # one request's input rows, every tensor with the same first dimension


@dataclass
class Models:
    """A request's input rows (`inputs`); the rows of requests of one workload as one pass (`forward`)."""

    vae: nn.Module  # vae_conv
    vq: nn.Module  # vqvae
    prior: nn.Module  # vqvae_pixelcnn, class-conditional
    device: torch.device

    @classmethod
    def load(cls, weights_dir: Path, device: torch.device) -> Models:
        """The same weight files the service serves, through the same loader."""
        return cls(**{key: load_model(Path(weights_dir) / name, device)[0] for key, name in WEIGHT_FILES.items()},
                   device=device)

    def inputs(self, workload: str, seed: int | None = None, upload: bytes | None = None, filename: str = "") -> Inputs:
        """One request's input rows, on the CPU: a drawn sample's, or a decoded upload (1, C, H, W)."""
        if workload == "reconstruct-vae_conv":
            return (decode_upload(upload, filename, image_shape=tuple(self.vae.image_shape), max_pixels=MAX_PIXELS)[None],)
        if workload == "sample-vae_conv-16":
            return sample_inputs(self.vae, SAMPLE_N[workload], seed, TEMPERATURE)  # eps, uniforms, temperatures
        return sample_inputs(self.vq, SAMPLE_N[workload], seed, TEMPERATURE, self.prior)  # uniforms, temperatures, labels

    def forward(self, workload: str, *inputs: torch.Tensor) -> torch.Tensor:
        """Rows of one or more requests -> images (B, C, H, W) in [0, 1] on the CPU, as one pass."""
        inputs = tuple(t.to(self.device) for t in inputs)
        with torch.inference_mode():
            images = (self.vae.reconstruct(inputs[0]) if workload == "reconstruct-vae_conv" else self.vae.sample_from(*inputs)
                      if workload == "sample-vae_conv-16" else self.vq.sample_from(self.prior, *inputs))
        return images.float().cpu()

    def warmup(self) -> None:
        """One pass per workload, so the first request does not pay for lazy initialisation."""
        c, h, w = self.vae.image_shape
        upload = png_bytes(Image.new("L" if c == 1 else "RGB", (w, h)))
        for workload in WORKLOADS:
            self.forward(workload, *self.inputs(workload, seed=0, upload=upload))


def run_batch(models: Models, items: list[tuple[str, Inputs]]) -> list[torch.Tensor]:
    """(workload, inputs) per request -> its images, in order; one pass per workload in the batch."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, (workload, _) in enumerate(items):
        groups[workload].append(i)
    out: list[torch.Tensor] = [None] * len(items)  # type: ignore[list-item]
    for workload, indices in groups.items():
        columns = zip(*(items[i][1] for i in indices), strict=True)  # per input tensor, every request's rows
        images = models.forward(workload, *(torch.cat(rows) for rows in columns))
        for i, part in zip(indices, torch.split(images, [int(items[i][1][0].shape[0]) for i in indices]), strict=True):
            out[i] = part
    return out


def resolve_device(name: str) -> torch.device:
    """A torch device from a GENSERVE_DEVICE-style name: "auto" is cuda when available, else cpu."""
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def create_app(args) -> FastAPI:
    state: dict = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        torch.set_num_threads(args.threads)
        executor = ThreadPoolExecutor(max_workers=args.parallel, thread_name_prefix="plain-model")
        loop = asyncio.get_running_loop()
        models = await loop.run_in_executor(executor, Models.load, args.weights, resolve_device(args.device))
        await loop.run_in_executor(executor, models.warmup)
        state.update(models=models, executor=executor)
        try:
            yield
        finally:
            executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(lifespan=lifespan)

    async def respond(workload: str, inputs: Inputs) -> Response:
        images = await asyncio.get_running_loop().run_in_executor(state["executor"], state["models"].forward, workload,
                                                                  *inputs)  # fmt: skip
        return Response(await asyncio.to_thread(grid_png, images), media_type="image/png")

    @app.get("/health")
    async def health() -> Response:
        return Response("ok" if state else "starting", status_code=200 if state else 503)

    @app.get("/sample")
    async def sample(model: str, seed: Annotated[int, Query(ge=0)], n: int = 16, prior: str | None = None) -> Response:
        workload = {("vae_conv", None): "sample-vae_conv-16", ("vqvae", "pixelcnn"): "sample-pixelcnn-1"}.get((model, prior))
        if workload is None or n != SAMPLE_N[workload]:
            raise HTTPException(422, "this peer serves model=vae_conv&n=16 and model=vqvae&prior=pixelcnn&n=1 only")
        return await respond(workload, state["models"].inputs(workload, seed=seed))

    @app.post("/reconstruct")
    async def reconstruct(model: str, file: Annotated[UploadFile, File()]) -> Response:
        if model != "vae_conv":
            raise HTTPException(422, "this peer reconstructs with model=vae_conv only")
        data = await file.read()
        try:
            inputs = await asyncio.to_thread(state["models"].inputs, "reconstruct-vae_conv", upload=data,
                                             filename=file.filename or "")  # fmt: skip
        except ImageError as err:
            raise HTTPException(err.status_code, err.detail) from None
        return await respond("reconstruct-vae_conv", inputs)

    return app


if ls is not None:

    class WorkloadAPI(ls.LitAPI):
        # decode_request and encode_response stay unannotated: LitServe reads their annotations to build
        # the route (an annotated `request` would switch off its JSON / multipart handling).

        def __init__(self, weights, threads: int) -> None:
            super().__init__(max_batch_size=32, batch_timeout=0.005, api_path="/predict")
            self.weights, self.threads = weights, threads

        def setup(self, device: str) -> None:
            torch.set_num_threads(self.threads)
            self.models = Models.load(self.weights, torch.device(device))
            self.models.warmup()

        def decode_request(self, request):
            """A JSON dict or the multipart form (a starlette UploadFile, pickled over) -> (workload, input rows)."""
            workload, upload = request["workload"], request.get("file")
            if workload == "reconstruct-vae_conv":
                return workload, self.models.inputs(workload, upload=upload.file.read(), filename=upload.filename or "")
            return workload, self.models.inputs(workload, seed=int(request["seed"]))

        def batch(self, inputs: list) -> list:
            return inputs  # run_batch concatenates per workload

        def predict(self, x: list) -> list[torch.Tensor]:
            return run_batch(self.models, x)

        def unbatch(self, output: list) -> list:
            return output

        def encode_response(self, output):
            return Response(grid_png(output), media_type="image/png")


def serve_litserve(args) -> None:
    server = ls.LitServer(WorkloadAPI(args.weights.resolve(), args.threads), accelerator=resolve_device(args.device).type,
                          devices=1, workers_per_device=1, fast_queue=args.fast_queue)  # fmt: skip
    main_pid = os.getpid()

    def interrupt(signum: int, _frame: object) -> None:
        if os.getpid() != main_pid:  # the forked API server inherited this handler: end as SIGTERM would
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    try:
        server.run(host=args.host, port=args.port, generate_client_file=False, log_level="warning", access_log=False)
    except KeyboardInterrupt:
        pass
    finally:
        for child in multiprocessing.active_children():  # what LitServe's shutdown left running
            child.kill()
            child.join(5)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peer", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--weights", type=Path, default=ROOT / "weights", help="the directory of the weight files")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads where the models run")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:N")
    parser.add_argument("--parallel", type=int, default=1, help="plain: forward passes that may run at once (default 1)")
    parser.add_argument("--litserve", action="store_true", help="serve with LitServe instead (batching on)")
    parser.add_argument("--fast-queue", action="store_true", help="with --litserve: LitServer(fast_queue=True)")
    arguments = parser.parse_args()
    if arguments.litserve:
        serve_litserve(arguments)
    else:
        import uvicorn

        uvicorn.run(create_app(arguments), host=arguments.host, port=arguments.port, access_log=False, log_level="warning")
