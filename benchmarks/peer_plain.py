"""The no-batching baseline of benchmarks/peers.py: one FastAPI app that calls the model per request.

    python -m benchmarks.peer_plain --port 8001 --weights weights --threads 2

Serves the service's own routes for the workloads of benchmarks/peer_workloads.py, so the client
sends both the same requests and gets the same bytes back: GET /sample?model=vae_conv&n=16&seed=S,
GET /sample?model=vqvae&prior=pixelcnn&n=1&seed=S, POST /reconstruct?model=vae_conv (multipart
`file`), and GET /health (200 once the models are loaded and warmed up).

One uvicorn process, torch.set_num_threads(--threads). Each request does what the service does
minus the batcher: inputs drawn in the event loop, the upload decoded and the PNG encoded in
asyncio's default thread pool, the forward pass (one request's rows) in a pool of --parallel
threads. The default, 1, runs one pass at a time, as the service's model thread does: on a CPU,
passes at once only share the same cores (on 2 cores, --parallel 4 was no faster at C=4: 250 vs 252
req/s for vae_conv n=16, 30 vs 21 for PixelCNN n=1). Try `peers --plain-parallel N` on a GPU.
"""

from __future__ import annotations

import asyncio
import contextlib
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated

import torch
import uvicorn
from fastapi import FastAPI, File, HTTPException, Query, UploadFile
from fastapi.responses import Response

from app.imaging import ImageError, grid_png
from benchmarks.peer_workloads import SAMPLE_N, Models, peer_parser, resolve_device

SAMPLE_WORKLOADS = {("vae_conv", None): "sample-vae_conv-16", ("vqvae", "pixelcnn"): "sample-pixelcnn-1"}


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

    async def respond(workload: str, inputs: tuple[torch.Tensor, ...]) -> Response:
        loop = asyncio.get_running_loop()
        images = await loop.run_in_executor(state["executor"], state["models"].forward, workload, *inputs)
        return Response(await asyncio.to_thread(grid_png, images), media_type="image/png")

    @app.get("/health")
    async def health() -> Response:
        return Response("ok" if state else "starting", status_code=200 if state else 503)

    @app.get("/sample")
    async def sample(model: str, seed: Annotated[int, Query(ge=0)], n: int = 16, prior: str | None = None) -> Response:
        workload = SAMPLE_WORKLOADS.get((model, prior))
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
                                             filename=file.filename or "")
        except ImageError as err:
            raise HTTPException(err.status_code, err.detail) from None
        return await respond("reconstruct-vae_conv", inputs)

    return app


def main() -> None:
    p = peer_parser(__doc__, "peer_plain")
    p.add_argument("--parallel", type=int, default=1, help="forward passes that may run at once (default 1)")
    args = p.parse_args()
    uvicorn.run(create_app(args), host=args.host, port=args.port, access_log=False, log_level="warning")


if __name__ == "__main__":
    main()
