"""One training loop for every model kind: bf16 autocast, AdamW + warmup/cosine, grad clipping, EMA,
atomic checkpoints with exact resume, validation, scalar logs, progress bar; data parallel under
torchrun (gloo): each rank takes its own slice of every global batch and gradients are all-reduced.

A *task* (one file per model kind in this package) supplies the model, the data and the losses:

    task.model                     nn.Module that is EMA-averaged and exported
    task.optim_groups()            {"name": [params]} -> one AdamW per name, stepped in that order
    task.losses(batch, step)       ({"name": loss}, {"scalar": float}) for one batch
    task.trainable_modules()       {"name": module} saved in the training state
    task.dataset                   map-style dataset of (index, aug_seed) -> sample
    task.validate(model, out_dir, step) -> {"metric": float}   (optional)
    task.after_step(batch, step) -> {"scalar": float}          (optional, after the optimizer steps)
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from tessera.checkpoint import load_training_state, save_training_state
from tessera.config import Config


@dataclasses.dataclass
class TrainConfig(Config):
    max_steps: int = 20000
    batch_size: int = 16
    lr: float = 2e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 500
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    bf16: bool = True
    ckpt_every: int = 500
    log_every: int = 20
    val_every: int = 1000
    seed: int = 0
    num_workers: int = 0
    tensorboard: bool = False


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warmup to `lr`, then cosine decay to `lr * min_lr_ratio` at `max_steps`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class EMA:
    """Exponential moving average of a module's floating-point state (with warmup of the decay)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for e, p in zip(self.model.state_dict().values(), model.state_dict().values()):
            if e.dtype.is_floating_point:
                e.lerp_(p.detach(), 1.0 - d)
            else:
                e.copy_(p)


class StepBatchSampler(torch.utils.data.Sampler):
    """Yields [(index, aug_seed), ...] batches from `start_step` on: a fresh seeded permutation per
    epoch, so batch k is the same whether the run was interrupted or not. Shards by DDP rank."""

    def __init__(self, n: int, batch_size: int, seed: int, start_step: int = 0, rank: int = 0, world: int = 1):
        if n < 1:
            raise ValueError("the training dataset is empty")
        self.n, self.bs, self.seed, self.start, self.rank, self.world = n, batch_size, seed, start_step, rank, world

    def _perm(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step, global_bs = self.start, self.bs * self.world
        cache: dict[int, torch.Tensor] = {}
        while True:
            items = []
            for j in range(self.bs):
                pos = step * global_bs + self.rank * self.bs + j
                epoch, i = divmod(pos, self.n)
                if epoch not in cache:
                    cache = {epoch: self._perm(epoch)}
                items.append((int(cache[epoch][i]), self.seed * 7_919 + pos))
            yield items
            step += 1


class _StopOnSignal:
    """While active, SIGINT / SIGTERM only set `requested`; the loop then ends after the current step
    (a step half-applied to the model and half to the discriminator would not resume exactly)."""

    def __init__(self):
        self.requested = False
        self._old: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __enter__(self) -> "_StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def _dist_info() -> tuple[int, int]:
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        if not dist.is_initialized():
            dist.init_process_group("gloo")
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class Trainer:
    def __init__(self, task: Any, cfg: TrainConfig, run_dir: str | Path):
        self.task, self.cfg, self.run_dir = task, cfg, Path(run_dir)
        self.rank, self.world = _dist_info()
        torch.manual_seed(cfg.seed + self.rank)
        self.model: nn.Module = task.model
        self.ema = EMA(self.model, cfg.ema_decay)
        self.groups = task.optim_groups()
        self.optims = {name: torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
                       for name, params in self.groups.items()}
        self.step = 0
        self._tb = None
        if self.world > 1:
            self._broadcast_from_rank0()

    # ---- data parallel (torchrun, gloo): same init everywhere, gradients averaged after backward --
    def _broadcast_from_rank0(self) -> None:
        for module in self.task.trainable_modules().values():
            for t in module.state_dict().values():
                dist.broadcast(t, src=0)

    def _average_gradients(self, params: list[torch.Tensor]) -> None:
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.flatten() for g in grads])  # one all-reduce per optimizer
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    # ---- checkpointing -------------------------------------------------------------------
    @property
    def ckpt_path(self) -> Path:
        return self.run_dir / "state.pt"

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "task": {k: v.state_dict() for k, v in self.task.trainable_modules().items()},
            "ema": self.ema.model.state_dict(),
            "optim": {k: o.state_dict() for k, o in self.optims.items()},
            "rng": torch.get_rng_state(),
            "train_config": self.cfg.to_dict(),
        }

    def save(self) -> None:
        if self.rank == 0:
            save_training_state(self.state_dict(), self.ckpt_path)
        if self.world > 1:
            dist.barrier()

    def resume(self) -> bool:
        if not self.ckpt_path.exists():
            return False
        state = load_training_state(self.ckpt_path)
        for k, m in self.task.trainable_modules().items():
            m.load_state_dict(state["task"][k], strict=True)
        self.ema.model.load_state_dict(state["ema"], strict=True)
        for k, o in self.optims.items():
            o.load_state_dict(state["optim"][k])
        torch.set_rng_state(state["rng"])
        self.step = int(state["step"])
        return True

    # ---- logging ----------------------------------------------------------------------------
    def log(self, scalars: dict[str, float]) -> None:
        if self.rank != 0:
            return
        with open(self.run_dir / "log.jsonl", "a") as f:
            f.write(json.dumps({"step": self.step, **scalars}) + "\n")
        if self.cfg.tensorboard:
            if self._tb is None:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.run_dir / "tb"))
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, self.step)

    # ---- the loop -----------------------------------------------------------------------------
    def _loader(self) -> Iterator[Any]:
        sampler = StepBatchSampler(len(self.task.dataset), self.cfg.batch_size, self.cfg.seed,
                                   self.step, self.rank, self.world)
        loader = torch.utils.data.DataLoader(self.task.dataset, batch_sampler=sampler,
                                             num_workers=self.cfg.num_workers,
                                             # own generator: creating the iterator must not draw from
                                             # the global RNG, or a resumed run would diverge
                                             generator=torch.Generator().manual_seed(self.cfg.seed + self.step),
                                             persistent_workers=self.cfg.num_workers > 0)
        return iter(loader)

    def train_step(self, batch: Any) -> dict[str, float]:
        self.model.train()
        lr = lr_at(self.cfg, self.step)  # the schedule is a function of the step: nothing to save
        for opt in self.optims.values():
            for group in opt.param_groups:
                group["lr"] = lr
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.cfg.bf16):
            losses, logs = self.task.losses(batch, self.step)
        for name, loss in losses.items():
            if not torch.isfinite(loss):
                raise FloatingPointError(f"step {self.step}: loss '{name}' is {loss.item()}")
            opt = self.optims[name]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            params = [p for g in opt.param_groups for p in g["params"]]
            if self.world > 1:
                self._average_gradients(params)
            if self.cfg.grad_clip > 0:
                logs[f"grad_norm_{name}"] = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip))
            opt.step()
        if hasattr(self.task, "after_step"):  # parameter surgery that must not precede backward()
            logs.update(self.task.after_step(batch, self.step))
        self.ema.update(self.model, self.step)
        logs["lr"] = lr
        return logs

    def fit(self, max_steps: int | None = None, resume: bool = True, progress: bool = True) -> dict[str, float]:
        from tqdm import tqdm

        max_steps = max_steps if max_steps is not None else self.cfg.max_steps
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            self.resume()
        batches = self._loader()
        bar = tqdm(total=max_steps, initial=self.step, disable=not progress or self.rank != 0,
                   dynamic_ncols=True, desc="train")
        logs: dict[str, float] = {}
        t0, n0 = time.time(), self.step
        with _StopOnSignal() as stop:
            while self.step < max_steps and not stop.requested:
                logs = self._one_step(next(batches), bar, max_steps, t0, n0)
                if "it_s" in logs:
                    t0, n0 = time.time(), self.step
            if stop.requested:  # Ctrl-C / SIGTERM: finish the step, save, then stop
                self.save()
                bar.close()
                raise KeyboardInterrupt(f"stopped at step {self.step}; state saved to {self.ckpt_path}")
        bar.close()
        return logs

    def _one_step(self, batch: Any, bar, max_steps: int, t0: float, n0: int) -> dict[str, float]:
        logs = self.train_step(batch)
        self.step += 1
        bar.update(1)
        if self.step % self.cfg.log_every == 0 or self.step == max_steps:
            logs["it_s"] = (self.step - n0) / max(1e-9, time.time() - t0)
            self.log(logs)
            bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if k in ("rec", "loss", "perc", "it_s")})
        if self.step % self.cfg.ckpt_every == 0 or self.step == max_steps:
            self.save()
        if self.cfg.val_every and (self.step % self.cfg.val_every == 0 or self.step == max_steps):
            self.validate()
        return logs

    def validate(self) -> dict[str, float]:
        if self.rank != 0 or not hasattr(self.task, "validate"):
            return {}
        out = self.run_dir / "val"
        out.mkdir(exist_ok=True)
        metrics = self.task.validate(self.ema.model, out, self.step)
        self.log({f"val/{k}": v for k, v in metrics.items()})
        return metrics
