"""The no-batching baseline of benchmarks/peers.py: one FastAPI app that calls the model per request.

    python benchmarks/peer_plain.py --port 8001 --weights weights --threads 2

Serves the service's own routes for the three workloads of benchmarks/peer_workloads.py, so the
client sends both the same requests and gets the same bytes back:

    GET  /sample?model=vae_conv&n=16&seed=S
    GET  /sample?model=vqvae&prior=pixelcnn&n=1&seed=S
    POST /reconstruct?model=vae_conv        multipart field `file`: one image
    GET  /health                            200 once the models are loaded and warmed up

One uvicorn process, torch.set_num_threads(--threads). Each request does what the service does
minus the batcher: noise drawn in the event loop, the upload decoded and the PNG encoded in
asyncio's default thread pool (the service's upload/PNG pool), and the forward pass, one
request's rows, in a ThreadPoolExecutor of --parallel threads.

The default, --parallel 1, runs one pass at a time, as the service's device thread does; it is
the faster choice on a CPU, where passes running at once only share the same cores (each
already uses --threads of them). On the 2-core box, at C=4 with 2 torch threads, --parallel 4
(what a `def` endpoint in FastAPI's thread pool amounts to) was no faster: sample-vae_conv-16
250 vs 252 req/s, sample-pixelcnn-1 30 vs 21 req/s with p99 172 vs 414 ms, reconstruct-vae_conv
312 vs 204 req/s (3 s cells, a shared and busy machine). Try `peers.py --plain-parallel N` on a
bigger machine or a GPU.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated

import torch
import uvicorn
from fastapi import FastAPI, File, HTTPException, Query, UploadFile
from fastapi.responses import Response

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from app.imaging import ImageError, grid_png  # noqa: E402
from peer_workloads import SAMPLE_N, Models, resolve_device  # noqa: E402


def sample_workload(model: str, n: int, prior: str | None) -> str:
    """The workload a /sample query asks for; 422 for anything else."""
    for workload, expected in (
        ("sample-vae_conv-16", ("vae_conv", None)),
        ("sample-pixelcnn-1", ("vqvae", "pixelcnn")),
    ):
        if (model, prior) == expected and n == SAMPLE_N[workload]:
            return workload
    raise HTTPException(422, "this peer serves model=vae_conv&n=16 and model=vqvae&prior=pixelcnn&n=1 only")


def create_app(weights: Path, device: torch.device, threads: int, parallel: int) -> FastAPI:
    state: dict[str, object] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        torch.set_num_threads(threads)
        executor = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="plain-model")
        loop = asyncio.get_running_loop()
        models = await loop.run_in_executor(executor, Models.load, weights, device)
        await loop.run_in_executor(executor, models.warmup)
        state.update(models=models, executor=executor)
        try:
            yield
        finally:
            executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(lifespan=lifespan)

    async def respond(workload: str, inputs: tuple[torch.Tensor, ...]) -> Response:
        models: Models = state["models"]  # type: ignore[assignment]
        loop = asyncio.get_running_loop()
        images = await loop.run_in_executor(state["executor"], models.forward, workload, *inputs)  # type: ignore[arg-type]
        return Response(await asyncio.to_thread(grid_png, images), media_type="image/png")

    @app.get("/health")
    async def health() -> Response:
        return Response("ok" if state else "starting", status_code=200 if state else 503)

    @app.get("/sample")
    async def sample(
        model: str,
        seed: Annotated[int, Query(ge=0)],
        n: int = 16,
        prior: str | None = None,
    ) -> Response:
        workload = sample_workload(model, n, prior)
        return await respond(workload, state["models"].inputs(workload, seed=seed))  # type: ignore[attr-defined]

    @app.post("/reconstruct")
    async def reconstruct(model: str, file: Annotated[UploadFile, File()]) -> Response:
        if model != "vae_conv":
            raise HTTPException(422, "this peer reconstructs with model=vae_conv only")
        models: Models = state["models"]  # type: ignore[assignment]
        data = await file.read()
        try:
            inputs = await asyncio.to_thread(
                models.inputs, "reconstruct-vae_conv", upload=data, filename=file.filename or ""
            )
        except ImageError as err:
            raise HTTPException(err.status_code, err.detail) from None
        return await respond("reconstruct-vae_conv", inputs)

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--weights", type=Path, default=ROOT / "weights", help="the directory of the weight files")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:N")
    parser.add_argument("--parallel", type=int, default=1, help="forward passes that may run at once (default 1)")
    args = parser.parse_args()
    app = create_app(args.weights, resolve_device(args.device), args.threads, args.parallel)
    uvicorn.run(app, host=args.host, port=args.port, access_log=False, log_level="warning")


if __name__ == "__main__":
    main()
