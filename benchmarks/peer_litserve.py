"""The LitServe peer of benchmarks/peers.py: LitServe 0.2.19 with batching on.

    python benchmarks/peer_litserve.py --port 8002 --weights weights --threads 2 [--fast-queue]

One LitAPI serves the three workloads of benchmarks/peer_workloads.py at LitServe's one route,
`POST /predict` (LitServe registers its api_path for POST only):

    JSON {"workload": "sample-vae_conv-16" | "sample-pixelcnn-1", "seed": S}
    multipart: field `workload` = "reconstruct-vae_conv", field `file` = one image

and answers with the PNG bytes, as a fastapi Response from encode_response (LitServe passes a
Response through untouched). GET /health is 200 once the worker has run `setup`.

Settings: max_batch_size=32, batch_timeout=0.005 s, one inference worker on --device (LitServe's
accelerator), one API server process (its default: one per worker), request timeout 30 s (its
default), no access log. `setup` runs in the worker: torch.set_num_threads(--threads), load the
models, one warm-up pass per workload. --fast-queue sets LitServer(fast_queue=True): responses
travel from the worker to the API server over ZeroMQ instead of a multiprocessing.Manager queue
(requests use a Manager queue in both modes).

Per batch, LitServe runs decode_request for each request, then batch, predict, unbatch, and
encode_response for each, all in the worker process, one after the other. Here decode_request
draws the noise or decodes the upload (the service's rule), predict groups the batch by workload
and runs one pass per group (`peer_workloads.run_batch`), encode_response makes the PNG.

LitServe 0.2.19 quirks handled here: `run` writes a client.py into the working directory unless
generate_client_file=False; SIGTERM would kill the main process and orphan its worker, API
server and Manager processes, so SIGTERM is turned into the KeyboardInterrupt that `run` shuts
down on; and whatever LitServe's shutdown leaves running is killed on the way out.
"""

import argparse
import multiprocessing
import os
import signal
import sys
from pathlib import Path

import litserve as ls
import torch
from fastapi.responses import Response

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from app.imaging import grid_png  # noqa: E402
from peer_workloads import Models, resolve_device, run_batch  # noqa: E402

MAX_BATCH_SIZE = 32
BATCH_TIMEOUT_S = 0.005


class WorkloadAPI(ls.LitAPI):
    # decode_request and encode_response stay unannotated: LitServe reads their annotations to
    # build the route (an annotated `request` would switch off its JSON / multipart handling).

    def __init__(self, weights: Path, threads: int) -> None:
        super().__init__(max_batch_size=MAX_BATCH_SIZE, batch_timeout=BATCH_TIMEOUT_S, api_path="/predict")
        self.weights = weights
        self.threads = threads

    def setup(self, device: str) -> None:
        torch.set_num_threads(self.threads)
        self.models = Models.load(self.weights, torch.device(device))
        self.models.warmup()

    def decode_request(self, request):
        """A JSON dict or the multipart form -> (workload, input rows)."""
        workload = request["workload"]
        if workload == "reconstruct-vae_conv":
            upload = request["file"]  # a starlette UploadFile, pickled over from the API server
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--weights", type=Path, default=ROOT / "weights", help="the directory of the weight files")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in the inference worker")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda")
    parser.add_argument("--fast-queue", action="store_true", help="LitServer(fast_queue=True): ZeroMQ responses")
    args = parser.parse_args()
    accelerator = resolve_device(args.device).type
    api = WorkloadAPI(args.weights.resolve(), args.threads)
    server = ls.LitServer(api, accelerator=accelerator, devices=1, workers_per_device=1, fast_queue=args.fast_queue)

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
    main()
