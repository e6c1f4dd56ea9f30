"""Is a cheap model stuck behind a slow one? Latency of a cheap request, idle and beside heavy load.

Starts the service (`python -m app`, harness.serving) and measures, one at a time with --pause s
between them, --requests of `GET /sample?model=<cheap>&n=1`: first on the idle server, then while
--heavy-clients clients send `GET /sample?model=<slow>&n=<heavy-n>` back to back (the autoregressive
`vae` drawing 256 images by default), after --settle s of that load. Prints p50/p90/max of both
phases and the busy / idle ratio of the p50s. Target: at most 2x, every answer 200.

    python -m benchmarks.fairness
    python -m benchmarks.fairness --cheap vae_conv --slow vae --heavy-n 256 --heavy-clients 4 --threads 2
"""

from __future__ import annotations

import asyncio
import contextlib
import sys

from benchmarks.harness import (
    Slowdown, looping, parse, parser, sample_request, series, serving, spread, stop_on_sigterm, verdict, worker_client,
)  # fmt: skip


async def run(url: str, args) -> tuple[Slowdown, int]:
    cheap, heavy = sample_request(args.cheap, None, 1), sample_request(args.slow, None, args.heavy_n)
    async with contextlib.AsyncExitStack() as stack:
        client, *loopers = [await stack.enter_async_context(worker_client(url, 600)) for _ in range(1 + args.heavy_clients)]
        await series(client, cheap, count=5)  # warm the connection
        idle = await series(client, cheap, count=args.requests, pause_s=args.pause)
        slowdown = Slowdown(f"{args.cheap} n=1", idle, [], 2.0)
        async with looping(loopers, heavy) as load:
            await asyncio.sleep(args.settle)  # let the heavy passes start
            slowdown.busy = await series(client, cheap, count=args.requests, pause_s=args.pause)
    return slowdown, sum(a.status == 200 for a in load.answers)


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__, env="GENSERVE_WORKERS=1")
    p.add_argument("--cheap", default="vae_conv", help="the cheap model (default vae_conv)")
    p.add_argument("--slow", default="vae", help="the slow model (default vae, autoregressive)")
    p.add_argument("--heavy-n", type=int, default=256, help="images per slow request (default 256)")
    p.add_argument("--heavy-clients", type=int, default=4, help="concurrent slow clients (default 4)")
    p.add_argument("--requests", type=int, default=50, help="cheap requests per phase (default 50)")
    p.add_argument("--pause", type=float, default=0.01, help="seconds between cheap requests (default 0.01)")
    p.add_argument("--settle", type=float, default=1.0, help="seconds of heavy load before measuring (default 1)")
    p.add_argument("--threads", type=int, default=None, help="GENSERVE_TORCH_THREADS (default: the service's own)")
    args = parse(p, "fairness", argv)
    stop_on_sigterm()
    threads = {"GENSERVE_TORCH_THREADS": str(args.threads)} if args.threads else {}
    with serving(args, threads, "genserve-fairness-") as (url, _):
        slowdown, heavy_done = asyncio.run(run(url, args))
    print(f"# {args.cheap} n=1, one at a time; beside it {args.heavy_clients} clients of {args.slow} n={args.heavy_n} "
          f"({heavy_done} answered); torch threads {args.threads}; settings: "
          + (" ".join(f"{k}={v}" for k, v in args.env.items()) or "defaults"))
    print(f"idle: {spread(slowdown.idle)}\nbusy: {spread(slowdown.busy)}")
    print(f"busy / idle p50: {slowdown.ratio:.2f}x (target <= 2x: {verdict(slowdown.met())})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
