"""The running service: settings, the registry, one batcher per (model, operation), metrics.

`Service.start` is what the lifespan runs: resolve the device, load and validate the weights,
warm every model up, start the batchers. `stop` refuses new work, drains the queues and
ends the workers. One single-thread executor runs every forward pass of the device, so
batches from different batchers never compete for the same cores or GPU stream.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from app.batching import Batcher, NotRunningError
from app.metrics import Metrics
from app.registry import Registry
from app.settings import Settings

log = logging.getLogger(__name__)

AUTOCAST_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Service:
    settings: Settings
    device: torch.device
    registry: Registry
    executor: ThreadPoolExecutor
    metrics: Metrics
    batchers: dict[tuple[str, str], Batcher] = field(default_factory=dict)
    ready: bool = False

    @classmethod
    async def start(cls, settings: Settings, metrics: Metrics) -> Service:
        device = settings.resolve_device()
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        if settings.precision != "fp32" and device.type != "cuda":
            log.warning("precision=%s applies on CUDA only; %s runs in fp32", settings.precision, device)
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"genserve-{device.type}")
        loop = asyncio.get_running_loop()
        try:
            registry = await loop.run_in_executor(executor, Registry.load, settings.weights_dir, device)
            await loop.run_in_executor(executor, registry.warmup)
        except BaseException:
            executor.shutdown(wait=False, cancel_futures=True)
            raise
        service = cls(settings, device, registry, executor, metrics)
        for name, entry in registry.entries.items():
            for op, fn in entry.ops().items():
                batcher = Batcher(
                    name=f"{name}:{op}",
                    fn=fn,
                    executor=executor,
                    device=device,
                    max_batch_size=settings.max_batch_size,
                    max_wait_s=settings.max_wait_ms / 1000,
                    max_queue=settings.max_queue,
                    pad=settings.pad_batches,
                    autocast_dtype=AUTOCAST_DTYPES[settings.precision],
                    on_batch=metrics.observe_batch,
                )
                batcher.start()
                service.batchers[(name, op)] = batcher
        service.ready = True
        log.info(
            "ready on %s: %s", device, ", ".join(f"{e.name} ({e.kind}, priors {sorted(e.priors)})" for e in registry.entries.values())
        )
        return service

    async def stop(self) -> None:
        self.ready = False
        await asyncio.gather(*(b.stop(self.settings.request_timeout_s) for b in self.batchers.values()))
        self.executor.shutdown(wait=False, cancel_futures=True)

    def batcher(self, model: str, op: str) -> Batcher:
        if not self.ready:
            raise NotRunningError("the service is not ready")
        return self.batchers[(model, op)]
