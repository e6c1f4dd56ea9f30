"""The LitServe peer of benchmarks/peers.py: LitServe 0.2.19 with batching on.

    python -m benchmarks.peer_litserve --port 8002 --weights weights --threads 2 [--fast-queue]

One LitAPI serves the workloads of benchmarks/peer_workloads.py at LitServe's one route, POST
/predict (LitServe registers its api_path for POST only): JSON {"workload": "sample-vae_conv-16" |
"sample-pixelcnn-1", "seed": S}, or multipart with field `workload` = "reconstruct-vae_conv" and
`file`; it answers with the PNG bytes (a fastapi Response from encode_response passes through
untouched). GET /health is 200 once the worker has run `setup`.

Settings: max_batch_size=32, batch_timeout=5 ms, one inference worker on --device, one API server,
LitServe's 30 s request timeout, no access log. `setup` (in the worker): torch threads, the models,
one warm-up pass per workload. --fast-queue: LitServer(fast_queue=True), responses over ZeroMQ
instead of a multiprocessing.Manager queue. Per batch LitServe runs decode_request for each request
(the inputs drawn or the upload decoded), predict (one pass per workload: peer_workloads.run_batch)
and encode_response for each (the PNG), all in the worker process.

LitServe 0.2.19 quirks handled: `run` writes a client.py into the working directory unless
generate_client_file=False; SIGTERM would kill the main process and orphan its worker, API server
and Manager processes, so it becomes the KeyboardInterrupt that `run` shuts down on; whatever its
shutdown leaves running is killed on the way out.
"""

import multiprocessing
import os
import signal

import litserve as ls
import torch
from fastapi.responses import Response

from app.imaging import grid_png
from benchmarks.peer_workloads import Models, peer_parser, resolve_device, run_batch


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
    p = peer_parser(__doc__, "peer_litserve")
    p.add_argument("--fast-queue", action="store_true", help="LitServer(fast_queue=True): ZeroMQ responses")
    args = p.parse_args()
    api = WorkloadAPI(args.weights.resolve(), args.threads)
    server = ls.LitServer(api, accelerator=resolve_device(args.device).type, devices=1, workers_per_device=1,
                          fast_queue=args.fast_queue)
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
