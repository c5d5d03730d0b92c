"""One training loop for every model kind: autocast on the chosen device (tessera.device), AdamW + warmup/cosine, grad clipping, EMA,
atomic checkpoints with exact resume, validation, scalar logs, progress bar; data parallel under
torchrun (train/distributed.py: torch DDP by default, FSDP2 with train.strategy=fsdp): each rank takes
its own slice of every global batch; rank 0 alone logs and writes checkpoints, which load at any world
size.

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
from tessera.train import distributed as ddp


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
    device: str = "auto"         # cpu | cuda | cuda:N | auto (under torchrun with CUDA: cuda:LOCAL_RANK)
    dtype: str = "auto"          # autocast dtype: float32 | bfloat16 | float16 | auto (tessera.device)
    ckpt_every: int = 500
    log_every: int = 20
    val_every: int = 1000
    seed: int = 0
    num_workers: int = 0
    tensorboard: bool = False
    strategy: str = "ddp"        # under torchrun: ddp | fsdp (FSDP2)
    init: str = ""               # fine-tune: a model folder / preset of the same family and config whose
                                 #   weights start a fresh run (loaded strictly; ignored on --resume)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        data = dict(data)
        if "bf16" in data:  # runs written before `dtype`: bf16 true/false
            data.setdefault("dtype", "bfloat16" if data.pop("bf16") else "float32")
        return super().from_dict(data)


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
            p = ddp.full(p.detach())  # an FSDP2 shard -> the whole tensor (the EMA copy is not sharded)
            if e.dtype.is_floating_point:
                e.lerp_(p, 1.0 - d)
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


class Trainer:
    def __init__(self, task: Any, cfg: TrainConfig, run_dir: str | Path):
        self.task, self.cfg, self.run_dir = task, cfg, Path(run_dir)
        if cfg.strategy not in ddp.STRATEGIES:
            raise ValueError(f"train.strategy={cfg.strategy!r}: must be one of {ddp.STRATEGIES}")
        self.rank, self.world = ddp.init_distributed()
        self.placement = ddp.rank_placement(cfg.device, cfg.dtype)
        self.strategy = cfg.strategy if self.world > 1 else None
        torch.manual_seed(cfg.seed + self.rank)
        self.model: nn.Module = task.model.to(self.placement.device)
        for module in task.trainable_modules().values():
            module.to(self.placement.device)
        if hasattr(task, "to"):  # frozen helpers of a task (perceptual network, ...)
            task.to(self.placement.device)
        self.ema = EMA(self.model, cfg.ema_decay)
        if self.strategy:  # same start everywhere, then DDP / FSDP2 in place (optimizers see the result)
            for module in self.task.trainable_modules().values():
                ddp.broadcast_from_rank0(module)
                if ddp.has_params(module):
                    ddp.wrap(module, self.strategy)
        self.groups = task.optim_groups()
        self.optims = {name: torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
                       for name, params in self.groups.items()}
        self.step = 0
        self._tb = None

    # ---- checkpointing -------------------------------------------------------------------
    @property
    def ckpt_path(self) -> Path:
        return self.run_dir / "state.pt"

    def _optim_module(self, name: str) -> nn.Module:
        return self.task.trainable_modules()[name]  # each optimizer holds one module's parameters

    def state_dict(self) -> dict[str, Any]:
        """Full (unsharded) state in the single-process format; every rank must call it (collective)."""
        return {
            "step": self.step,
            "task": {k: ddp.model_state(v, self.strategy) for k, v in self.task.trainable_modules().items()},
            "ema": self.ema.model.state_dict(),
            "optim": {k: ddp.optim_state(self._optim_module(k), o, self.strategy) for k, o in self.optims.items()},
            "rng": torch.get_rng_state(),
            "rng_ranks": ddp.gather_rng(self.rank, self.world),
            "train_config": self.cfg.to_dict(),
        }

    def save(self) -> None:
        state = self.state_dict()
        if self.rank == 0:
            save_training_state(state, self.ckpt_path)
        if self.world > 1:
            dist.barrier()

    def resume(self) -> bool:
        """Load the checkpoint if there is one (on every rank, whatever world size wrote it). The RNG
        continues exactly at the same world size; at another, each rank is re-seeded from (seed, rank, step)."""
        if not self.ckpt_path.exists():
            return False
        state = load_training_state(self.ckpt_path)
        for k, m in self.task.trainable_modules().items():
            ddp.load_model_state(m, state["task"][k], self.strategy)
        self.ema.model.load_state_dict(state["ema"], strict=True)
        for k, o in self.optims.items():
            ddp.load_optim_state(self._optim_module(k), o, state["optim"][k], self.strategy)
        self.step = int(state["step"])
        ranks = state.get("rng_ranks", [state["rng"]])
        if len(ranks) == self.world:
            torch.set_rng_state(ranks[self.rank])
        else:
            torch.manual_seed(self.cfg.seed * 1_000_003 + self.step * 1009 + self.rank)
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
        if isinstance(self.task.dataset, torch.utils.data.IterableDataset):
            return self._stream()
        sampler = StepBatchSampler(len(self.task.dataset), self.cfg.batch_size, self.cfg.seed,
                                   self.step, self.rank, self.world)
        loader = torch.utils.data.DataLoader(self.task.dataset, batch_sampler=sampler,
                                             num_workers=self.cfg.num_workers,
                                             # own generator: creating the iterator must not draw from
                                             # the global RNG, or a resumed run would diverge
                                             generator=torch.Generator().manual_seed(self.cfg.seed + self.step),
                                             persistent_workers=self.cfg.num_workers > 0)
        return iter(loader)

    def _stream(self) -> Iterator[Any]:
        """Batches from a streaming dataset (data/stream.py), epoch after epoch; re-seeded from the step."""
        self.task.dataset.reseed(self.cfg.seed * 1_000_003 + self.step)
        while True:
            loader = torch.utils.data.DataLoader(self.task.dataset, batch_size=self.cfg.batch_size, drop_last=True,
                                                 num_workers=self.cfg.num_workers)
            yield from loader

    def train_step(self, batch: Any) -> dict[str, float]:
        self.model.train()
        lr = lr_at(self.cfg, self.step)  # the schedule is a function of the step: nothing to save
        for opt in self.optims.values():
            for group in opt.param_groups:
                group["lr"] = lr
        batch = self.placement.to(batch)
        with self.placement.autocast():
            losses, logs = self.task.losses(batch, self.step)
        for name, loss in losses.items():
            if not torch.isfinite(loss):
                raise FloatingPointError(f"step {self.step}: loss '{name}' is {loss.item()}")
            opt = self.optims[name]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            params = [p for g in opt.param_groups for p in g["params"]]
            if self.cfg.grad_clip > 0:
                norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
                logs[f"grad_norm_{name}"] = float(ddp.full(norm))
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
            logs = self._mean_over_ranks(logs)  # the global batch's loss, not rank 0's share
            logs["it_s"] = (self.step - n0) / max(1e-9, time.time() - t0)
            self.log(logs)
            bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if k in ("rec", "loss", "perc", "it_s")})
        if self.step % self.cfg.ckpt_every == 0 or self.step == max_steps:
            self.save()
        if self.cfg.val_every and (self.step % self.cfg.val_every == 0 or self.step == max_steps):
            self.validate()
        return logs

    def _mean_over_ranks(self, logs: dict[str, float]) -> dict[str, float]:
        if self.world == 1:
            return logs
        keys = sorted(logs)  # every rank logs the same keys at the same steps
        t = torch.tensor([float(logs[k]) for k in keys], dtype=torch.float64)
        dist.all_reduce(t)
        return {k: float(v) / self.world for k, v in zip(keys, t.tolist())}

    def validate(self) -> dict[str, float]:
        if self.rank != 0 or not hasattr(self.task, "validate"):
            return {}
        out = self.run_dir / "val"
        out.mkdir(exist_ok=True)
        metrics = self.task.validate(self.ema.model, out, self.step)
        self.log({f"val/{k}": v for k, v in metrics.items()})
        return metrics
