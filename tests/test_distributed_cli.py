"""`tessera train` unchanged under torchrun on this CPU (gloo): 2 processes == 1 process at the same global
batch for DDP and FSDP2 (loss curve and weights), a run whose rank was killed resumes and continues as if
it had not been, and a checkpoint written by 2 processes resumes in 1."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import free_port, tiny_preset

STEPS, BATCH = 4, 4
# kills rank 1 right after step KILL_AT (the checkpoint of step 2 is on disk; step 3 is lost)
KILLER = r'''
import os, signal, sys
from tessera.train.trainer import Trainer
kill_at = int(os.environ["KILL_AT"])
one_step = Trainer._one_step
def _one_step(self, *a):
    out = one_step(self, *a)
    if self.rank == 1 and self.step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return out
Trainer._one_step = _one_step
from tessera.cli import main
sys.exit(main())
'''


@pytest.fixture(scope="module")
def token_data(tiny_dataset, tiny_model):
    from tessera.train.runs import prepare_token_inputs

    prepare_token_inputs(str(tiny_dataset), str(tiny_model), "tiny")  # caches once, before any torchrun
    return tiny_dataset, tiny_model


def train(token_data, out, nproc=1, strategy="ddp", steps=STEPS, resume=False, script=None, env=None):
    data, tok = token_data
    args = ["train", "ar", "--data", str(data), "--out", str(out), "--preset", tiny_preset("ar-tiny"), "--tokenizer", str(tok),
            "--text-encoder", "tiny", "--max-steps", str(steps), "--set", f"train.batch_size={BATCH // nproc}",
            "--set", f"train.strategy=\"{strategy}\"", "--set", "train.val_every=0", "--set", "train.log_every=1",
            "--set", "train.ckpt_every=2", "--set", "train.dtype=\"float32\"", "--set", "train.warmup_steps=1",
            "--set", "train.lr=0.003", "--set", "task.cond_drop=0.0"] + (["--resume"] if resume else [])
    target = [str(script)] if script else ["-m", "tessera.cli"]
    launcher = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                 f"--master_port={free_port()}"] if nproc > 1 else [sys.executable])
    return subprocess.run(launcher + target + args, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def losses(run) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())}


def weights(run) -> dict[str, torch.Tensor]:
    return torch.load(run / "state.pt", weights_only=True)["task"]["model"]


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def single(token_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "run"
    r = train(token_data, out)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one_at_the_same_global_batch(token_data, single, tmp_path, strategy):
    r = train(token_data, tmp_path / "two", nproc=2, strategy=strategy)
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = losses(single), losses(tmp_path / "two")
    assert sorted(two) == list(range(1, STEPS + 1))  # rank 0 alone wrote the log, once per step
    assert all(abs(one[s] - two[s]) < 1e-4 * max(1.0, one[s]) for s in one), (one, two)
    assert max_diff(weights(single), weights(tmp_path / "two")) < 1e-4
    # the loss moved: the comparison above is not between two untrained models
    assert one[STEPS] < one[1] - 0.05


def test_killed_rank_resumes_and_continues_the_same_run(token_data, tmp_path):
    whole = tmp_path / "whole"
    assert train(token_data, whole, nproc=2).returncode == 0
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    cut = tmp_path / "cut"
    r = train(token_data, cut, nproc=2, script=killer, env={"KILL_AT": "3"})
    assert r.returncode != 0  # torchrun saw rank 1 die and stopped the job
    assert torch.load(cut / "state.pt", weights_only=True)["step"] == 2
    r = train(token_data, cut, nproc=2, resume=True)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = losses(whole), losses(cut)
    assert all(abs(a[s] - b[s]) < 1e-5 * max(1.0, a[s]) for s in (3, 4)), (a, b)
    assert max_diff(weights(whole), weights(cut)) < 1e-5


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_checkpoint_of_two_processes_resumes_in_one(token_data, single, tmp_path, strategy):
    run = tmp_path / "run"
    r = train(token_data, run, nproc=2, strategy=strategy, steps=2)
    assert r.returncode == 0, r.stderr[-3000:]
    state = torch.load(run / "state.pt", weights_only=True)
    assert set(state["task"]["model"]) == set(weights(single))  # the single-process format, unsharded
    r = train(token_data, run, nproc=1, steps=STEPS, resume=True)
    assert r.returncode == 0, r.stderr[-3000:]
    one, mixed = losses(single), losses(run)
    assert all(abs(one[s] - mixed[s]) < 1e-4 * max(1.0, one[s]) for s in range(1, STEPS + 1)), (one, mixed)
    assert max_diff(weights(single), weights(run)) < 1e-4


@pytest.mark.parametrize("task,strategy", [("masked", "fsdp"), ("diffusion", "fsdp"), ("sr", "ddp"),
                                           ("tokenizer", "ddp")])
def test_every_trainer_runs_under_torchrun(token_data, tmp_path, task, strategy):
    """masked / diffusion / SR / the GAN tokenizer (two optimizers, discriminator on from step 0) on 2 ranks."""
    data, tok = token_data
    common = ["--data", str(data), "--out", str(tmp_path / "run"), "--max-steps", "2", "--set", "train.batch_size=2",
              "--set", "train.val_every=0", "--set", "train.log_every=1", "--set", f"train.strategy=\"{strategy}\""]
    extra = {"masked": ["--preset", tiny_preset("masked-tiny"), "--tokenizer", str(tok), "--text-encoder", "tiny"],
             "diffusion": ["--preset", tiny_preset("unet-tiny"), "--tokenizer", str(tok), "--text-encoder", "tiny"],
             "sr": ["--preset", tiny_preset("sr-tiny"), "--tokenizer", "", "--set", "task.crop=16"],
             "tokenizer": ["--preset", tiny_preset("vq-tiny"), "--set", "task.crop=32", "--set", "task.val_images=2",
                           "--set", "task.loss.perceptual_backbone=\"none\"", "--set", "task.loss.disc_start=0"]}[task]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        f"--master_port={free_port()}", "-m", "tessera.cli", "train", task, *common, *extra],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [1, 2] and all(row["loss"] == row["loss"] for row in log)
    if task == "tokenizer":
        assert all(row["grad_norm_disc"] > 0 for row in log)  # the discriminator trained too
