"""Data-parallel training under torchrun, on torch's own engines (the trainer runs unchanged):

    strategy "ddp"   torch DDP (its composable form, `replicate`, so the task keeps calling its modules):
                     parameters broadcast from rank 0, gradients all-reduced in buckets during backward
    strategy "fsdp"  FSDP2 (`fully_shard`): parameters, gradients and optimizer state sharded across
                     ranks; each block of every ModuleList is its own unit (inner ones first), then the root

The process group has gloo for CPU tensors and NCCL for CUDA tensors where CUDA exists ("cpu:gloo,cuda:nccl"),
so the CPU-side collectives (barriers, RNG gathers, log means) work beside GPU training. Checkpoints hold FULL (unsharded) model and optimizer state in
the single-process format, so a run saved at any world size resumes at any other.

    torchrun --nproc_per_node=2 -m tessera.cli train ar --data D --out R --set train.strategy=fsdp
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from tessera.device import Placement, placement

STRATEGIES = ("ddp", "fsdp")


def init_distributed() -> tuple[int, int]:
    """(rank, world size); joins the process group torchrun describes (nothing to do without it)."""
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        if not dist.is_initialized():
            dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_placement(device: str = "auto", dtype: str = "auto") -> Placement:
    """This rank's device: under torchrun an 'auto' / 'cuda' device is cuda:LOCAL_RANK."""
    spec = device
    if "LOCAL_RANK" in os.environ and device in ("auto", "cuda") and torch.cuda.is_available():
        spec = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    place = placement(spec, dtype)
    if place.device.type == "cuda":
        torch.cuda.set_device(place.device)
    return place


def shutdown() -> None:
    """After a run: every rank reaches here, then the process group (and gloo's threads) goes away before
    the interpreter exits (left alive, a rank may abort at exit: 'terminate called without an active
    exception')."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def rank0_first(fn, *args, **kwargs):
    """Run `fn` on rank 0 first, then on the other ranks (which find its caches complete): for the
    cache-building steps before training, which must not write the same files from two processes."""
    rank, world = init_distributed()
    if world > 1 and rank != 0:
        dist.barrier()
    out = fn(*args, **kwargs)
    if world > 1 and rank == 0:
        dist.barrier()
    return out


def has_params(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def wrap(module: nn.Module, strategy: str) -> None:
    """Make `module` data parallel in place (calls to it stay as they are)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"train.strategy={strategy!r}: must be one of {STRATEGIES}")
    if strategy == "ddp":
        from torch.distributed._composable.replicate import replicate

        replicate(module)
        return
    from torch.distributed.fsdp import fully_shard

    blocks = [(f"{name}.{i}", block) for name, sub in module.named_modules() if isinstance(sub, nn.ModuleList)
              for i, block in enumerate(sub) if has_params(block)]
    for _, block in sorted(blocks, key=lambda nb: -nb[0].count(".")):  # inner units before the ones holding them
        fully_shard(block)
    fully_shard(module)


def broadcast_from_rank0(module: nn.Module) -> None:
    for t in module.state_dict().values():
        dist.broadcast(t, src=0)


def full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2 shard) -> the whole tensor (an all-gather: every rank must call it)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def model_state(module: nn.Module, strategy: str | None) -> dict:
    """Full state dict (single-process keys); collective under fsdp, where only rank 0 gets it."""
    if strategy != "fsdp":
        return module.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(module, options=_options())


def load_model_state(module: nn.Module, state: dict, strategy: str | None) -> None:
    if strategy != "fsdp":
        module.load_state_dict(state, strict=True)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True, strict=True))


def optim_state(module: nn.Module, optim: torch.optim.Optimizer, strategy: str | None) -> dict:
    """Full optimizer state in torch's single-process format (parameters by index); collective under fsdp.
    The optimizer must hold `module`'s parameters in `module.parameters()` order (every task does)."""
    if strategy != "fsdp":
        return optim.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    sd = get_optimizer_state_dict(module, optim, options=_options())
    if not sd:  # full state with cpu_offload lands on rank 0 only (the rank that saves)
        return {}
    index = {name: i for i, (name, _) in enumerate(module.named_parameters())}
    return {"state": {index[k]: v for k, v in sd["state"].items()},
            "param_groups": [{**g, "params": [index[k] for k in g["params"]]} for g in sd["param_groups"]]}


def load_optim_state(module: nn.Module, optim: torch.optim.Optimizer, state: dict, strategy: str | None) -> None:
    if strategy != "fsdp":
        optim.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = [name for name, _ in module.named_parameters()]
    fqn = {"state": {names[i]: v for i, v in state["state"].items()},
           "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(module, optim, fqn, options=StateDictOptions(full_state_dict=True))


def gather_rng(rank: int, world: int) -> list[torch.Tensor]:
    """Every rank's CPU RNG state (for an exact resume at the same world size)."""
    mine = torch.get_rng_state()
    if world == 1:
        return [mine]
    out: list = [None] * world
    dist.all_gather_object(out, mine)
    return out
