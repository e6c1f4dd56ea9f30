"""One training loop for every model family: epochs, progress bar, evaluation, best checkpoint, resume, DDP.

A family plugs in with a `loss_fn(model, index) -> (loss, stats)` that builds its own batch
from the sample indices, an `evaluate(model) -> metrics` on a validation split (carved from the
training set: the best epoch is never chosen by looking at the test split), and
`save_best(model, metrics)`. Under `torchrun` the loop runs as DistributedDataParallel:
every rank takes a disjoint shard of each epoch's permutation; rank 0 evaluates and writes.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from models.io import load_model, save_model
from training.checkpoint import load_checkpoint, save_checkpoint

LossFn = Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, dict[str, Any]]]
SaveBest = Callable[[nn.Module, dict[str, Any], str], None]  # (model, metrics, the run's command chain)


@dataclass
class FitConfig:
    epochs: int
    batch_size: int
    lr: float
    seed: int
    run_dir: Path
    resume: bool = False
    lr_schedule: str = "constant"  # "constant", or "cosine": lr at the first step down to min_lr at the last of `epochs`
    min_lr: float = 0.0
    stop_after: int | None = None  # end this invocation after that epoch, on the schedule of `epochs` (resume later)
    best_key: str = "loss"  # the validation metric to minimise when choosing the best epoch
    progress: bool = True
    show: tuple[str, ...] = ()  # per-step stats shown beside the running loss in the progress bar
    running_totals: tuple[str, ...] = ()  # stats that are totals so far: the epoch reports the last value, not a mean
    command: str = ""  # this invocation's command line; a resumed run's file records every invocation's

    @classmethod
    def from_args(cls, args: Any, **family: Any) -> "FitConfig":
        """The command line's shared options (see training/__main__.py), plus the family's own fields."""
        return cls(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, run_dir=Path(args.run_dir),
                   resume=args.resume, lr_schedule=args.lr_schedule, min_lr=args.min_lr, stop_after=args.stop_after,
                   progress=not args.quiet, command=getattr(args, "command", ""), **family)

    def schedule(self, steps_per_epoch: int) -> dict[str, Any]:
        """What fixes every step's learning rate: a resume that changes any of it is told so."""
        return {"lr_schedule": self.lr_schedule, "lr": self.lr, "min_lr": self.min_lr if self.lr_schedule == "cosine" else None,
                "epochs": self.epochs if self.lr_schedule == "cosine" else None, "steps_per_epoch": steps_per_epoch}


LR_SCHEDULES = ("constant", "cosine")


def learning_rate(config: FitConfig, step: int, total_steps: int) -> float:
    """The learning rate of optimizer step `step` (0-based) of a run of `total_steps`.

    A function of the step alone, so a run resumed with the same settings continues the same curve.
    "cosine" is SGDR's annealing (Loshchilov & Hutter 2017, eq. 5) without restarts, from config.lr
    down to config.min_lr at the last step. Resumed with a larger --epochs, a cosine run jumps up to
    the longer curve's rate at that step and anneals from there.
    """
    if config.lr_schedule == "constant":
        return config.lr
    if config.lr_schedule != "cosine":
        raise ValueError(f"lr_schedule {config.lr_schedule!r} is not one of {LR_SCHEDULES}")
    progress = min(step / max(total_steps - 1, 1), 1.0)
    return config.min_lr + (config.lr - config.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def pick_device(name: str = "auto") -> torch.device:
    """'auto' -> CUDA when available, else CPU; anything else is passed to torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use --device cpu or auto")
    return device


def setup_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world_size, device). Initialises the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, pick_device(device_name)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class _LossModule(nn.Module):
    """Wraps model + loss so DistributedDataParallel sees the whole step as one forward."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, index: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        return self.loss_fn(self.model, index)


def fit(
    model: nn.Module,
    config: FitConfig,
    *,
    n_train: int,
    loss_fn: LossFn,
    evaluate: Callable[[nn.Module], dict[str, float]],
    save_best: SaveBest,
    on_epoch_end: Callable[[nn.Module, int], None] | None = None,
    rank: int = 0,
    world: int = 1,
    desc: str = "train",
) -> dict[str, Any]:
    """Train for config.epochs; return the state (history, best epoch and metrics)."""
    device = next(model.parameters()).device
    torch.manual_seed(config.seed + rank)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    step_module: nn.Module = _LossModule(model, loss_fn)
    if world > 1:
        step_module = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[device.index] if device.type == "cuda" else None
        )
    ckpt = config.run_dir / "checkpoint.safetensors"
    state: dict[str, Any] = {"epoch": 0, "best": math.inf, "best_epoch": None, "history": []}
    if config.resume:
        if not ckpt.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt}; start without --resume")
        state = load_checkpoint(ckpt, model, optimizer)  # restores the RNG state too
        if rank == 0:
            print(f"resumed from {ckpt} after epoch {state['epoch']}")
        state["commands"] = state.get("commands") or [f"(epochs 1-{state['epoch']}: command not recorded)"]
    state["commands"] = [*state.get("commands", []), config.command]

    per_rank = n_train // world
    steps_per_epoch = math.ceil(per_rank / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    last_epoch = config.epochs if config.stop_after is None else min(config.stop_after, config.epochs)
    if config.resume:
        _check_resume(config, state, steps_per_epoch, last_epoch, say=rank == 0)
    state["best_key"], state["schedule"] = config.best_key, config.schedule(steps_per_epoch)
    for epoch in range(state["epoch"] + 1, last_epoch + 1):
        model.train()
        # The same permutation on every rank (seeded by epoch), each rank takes its own shard.
        perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(config.seed * 100003 + epoch))
        shard = perm[rank * per_rank : (rank + 1) * per_rank]
        batches = list(shard.split(config.batch_size))
        bar = tqdm(batches, desc=f"{desc} {epoch}/{config.epochs}", disable=rank != 0 or not config.progress, leave=False)
        running, totals, last, count = None, {}, {}, 0
        lr = learning_rate(config, (epoch - 1) * steps_per_epoch, total_steps)
        for step_in_epoch, index in enumerate(bar):
            # The schedule, not the checkpoint's saved lr, sets every step's rate (a resumed run follows the curve).
            lr = learning_rate(config, (epoch - 1) * steps_per_epoch + step_in_epoch, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss, stats = step_module(index)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            value = loss.item()
            if not math.isfinite(value):
                raise FloatingPointError(f"training loss became {value} at epoch {epoch}; lower --lr")
            running = value if running is None else 0.98 * running + 0.02 * value
            for k, v in stats.items():
                if k in config.running_totals:
                    last[k] = float(v)
                else:
                    totals[k] = totals.get(k, 0.0) + float(v) * len(index)
            count += len(index)
            bar.set_postfix(loss=f"{running:.4g}", **{k: f"{float(stats[k]):.4g}" for k in config.show if k in stats})
        train_stats = {f"train_{k}": v / max(count, 1) for k, v in totals.items()}
        train_stats.update({f"train_{k}": v for k, v in last.items()})
        train_stats["train_last_lr"] = lr
        if world > 1:
            dist.barrier()
        if rank == 0:
            model.eval()
            metrics = {**train_stats, **evaluate(model)}
            improved = metrics[config.best_key] < state["best"]
            if improved:
                state["best"], state["best_epoch"] = metrics[config.best_key], epoch
                save_best(model, {**metrics, "epoch": epoch}, command_chain(state))
            if on_epoch_end is not None:
                on_epoch_end(model, epoch)
            state["history"].append({"epoch": epoch, **{k: float(f"{float(v):.6g}") for k, v in metrics.items()}})
            state["epoch"] = epoch
            save_checkpoint(ckpt, model, optimizer, state)
            shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
            print(f"epoch {epoch}: {shown}{' (best)' if improved else ''}", flush=True)
        else:
            state["epoch"] = epoch
        if world > 1:
            dist.barrier()
    return state


def _check_resume(config: FitConfig, state: dict[str, Any], steps_per_epoch: int, last_epoch: int, say: bool) -> None:
    """A resumed run: say what differs from the checkpoint's run, and restart the best-epoch choice
    when the selection metric changed (the saved best is on another scale)."""
    if last_epoch <= state["epoch"]:
        if say:
            print(f"the checkpoint is already at epoch {state['epoch']}, past --stop-after/--epochs {last_epoch}: "
                  "nothing to train")
        return
    chosen_by = state.get("best_key") or _old_best_key(state) or config.best_key
    if chosen_by != config.best_key:
        state.update(best=math.inf, best_epoch=None)
        if say:
            print(f"the best epoch is now chosen by {config.best_key}, not {chosen_by}: "
                  f"only epochs after {state['epoch']} compete")
    before, now = state.get("schedule"), config.schedule(steps_per_epoch)
    if say and before is not None and before != now:
        changed = ", ".join(f"{k} {before.get(k)} -> {v}" for k, v in now.items() if before.get(k) != v)
        print(f"the learning-rate schedule differs from the checkpoint's ({changed}): "
              f"from epoch {state['epoch'] + 1} the rate follows the new one")


def _old_best_key(state: dict[str, Any]) -> str | None:
    """A checkpoint from before best_key was saved: the metric of its best epoch that equals the saved best."""
    row = next((h for h in state["history"] if h["epoch"] == state.get("best_epoch")), None)
    if row is None or not math.isfinite(state["best"]):
        return None
    matches = [k for k, v in row.items() if k.startswith("val_") and math.isclose(v, state["best"], rel_tol=1e-4, abs_tol=1e-5)]
    return matches[0] if len(matches) == 1 else None


def command_chain(state: dict[str, Any]) -> str:
    """Every invocation that trained this file, in order (a resumed run is more than its last command)."""
    return " && ".join(state.get("commands", []))


def best_saver(args: Any, dataset: str, **save_kwargs: Any) -> SaveBest:
    """The `save_best` every family passes to `fit`: writes args.out with the run's name, data set and
    command chain; `epochs_planned` (--epochs) tells a file stopped early by --stop-after from a finished one."""

    def save_best(model: nn.Module, metrics: dict[str, Any], command: str) -> None:
        save_model(args.out, model, name=args.name, dataset=dataset, command=command,
                   metrics={**metrics, "epochs_planned": args.epochs}, **save_kwargs)

    return save_best


def stopped_early(args: Any, state: dict[str, Any]) -> bool:
    """True (and says so) when --stop-after ended the run before --epochs: the test split is then not
    touched; the weight file holds the best epoch so far, with its validation metrics."""
    if state["epoch"] >= args.epochs:
        return False
    print(f"stopped after epoch {state['epoch']} of {args.epochs}: no test evaluation yet; "
          f"{args.out} holds the best epoch so far ({state['best_epoch']}); continue with --resume")
    return True


def finish(
    args: Any,
    state: dict[str, Any],
    device: torch.device,
    dataset: str,
    test_metrics: Callable[[nn.Module], dict[str, Any]],
    **save_kwargs: Any,
) -> tuple[nn.Module, dict[str, Any]]:
    """The end of every run: reload the best epoch's file, evaluate it on the test split (the only
    time test data is seen), and save it again with those metrics. Returns (model, metrics)."""
    best, info = load_model(args.out, device)
    metrics = {**info.metrics, **test_metrics(best), "epochs_trained": state["epoch"], "best_epoch": state["best_epoch"],
               "selected_by": state["best_key"]}
    save_model(args.out, best, name=args.name, dataset=dataset, command=command_chain(state), metrics=metrics, **save_kwargs)
    return best, metrics
