import json

import pytest
import torch

from tessera.checkpoint import CheckpointError, export_model, load_model
from tessera.registry import build
from tessera.train.tokenizer import TokenizerTask, TokenizerTaskConfig, UsageTracker
from tessera.train.trainer import StepBatchSampler, TrainConfig, Trainer, lr_at


def tiny_trainer(data, run_dir, **train_kw):
    torch.manual_seed(0)
    model = build("vq-tiny")
    task_cfg = TokenizerTaskConfig.from_dict({"crop": 16, "usage_window": 2, "val_images": 4,
                                              "loss": {"perceptual_backbone": "open_nsfw", "disc_start": 2,
                                                       "disc_channels": 8, "disc_layers": 2}})
    task = TokenizerTask(model, data, task_cfg, pretrained_perceptual=False)
    cfg = TrainConfig(batch_size=4, max_steps=6, warmup_steps=2, ckpt_every=3, log_every=1, val_every=3,
                      **train_kw)
    return Trainer(task, cfg, run_dir)


def test_interrupted_then_resumed_matches_uninterrupted(tiny_dataset, tmp_path):
    full = tiny_trainer(tiny_dataset, tmp_path / "full")
    full.fit(progress=False, resume=False)

    part = tiny_trainer(tiny_dataset, tmp_path / "part")
    part.fit(max_steps=3, progress=False, resume=False)  # "interrupted" after the step-3 checkpoint
    resumed = tiny_trainer(tiny_dataset, tmp_path / "part")
    resumed.fit(progress=False, resume=True)
    assert resumed.step == 6
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    for a, b in zip(full.ema.model.state_dict().values(), resumed.ema.model.state_dict().values()):
        assert torch.equal(a, b)
    log_full = [json.loads(line) for line in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    log_part = [json.loads(line) for line in (tmp_path / "part" / "log.jsonl").read_text().splitlines()]
    losses = lambda log: [(r["step"], r["loss"]) for r in log if "loss" in r]  # noqa: E731
    assert losses(log_full) == losses(log_part)
    assert "d" in log_full[-2] or any("d" in r for r in log_full)  # the GAN switched on at step 2
    assert list((tmp_path / "full" / "val").glob("step_*.png"))
    assert any("val/psnr" in r for r in log_full)


def test_export_load_round_trip_identical(tmp_path, seeded):
    m = build("vq-tiny").eval()
    export_model(m, tmp_path / "m")
    back = load_model(tmp_path / "m")
    x = torch.rand(2, 3, 32, 32, generator=seeded) * 2 - 1
    assert torch.equal(m.encode(x), back.encode(x))
    assert torch.equal(m.decode_tokens(m.encode(x)), back.decode_tokens(back.encode(x)))
    meta = json.loads((tmp_path / "m" / "meta.json").read_text())
    assert meta["kind"] == "vq" and len(meta["sha256"]) == 64 and meta["tessera_version"]


def test_load_fails_loudly(tmp_path):
    m = build("vq-tiny")
    export_model(m, tmp_path / "m")
    with open(tmp_path / "m" / "model.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(CheckpointError, match="sha256"):
        load_model(tmp_path / "m")
    (tmp_path / "m" / "meta.json").unlink()
    with pytest.raises(FileNotFoundError, match="meta.json is missing"):
        load_model(tmp_path / "m")
    import tessera

    with pytest.raises(FileNotFoundError, match="neither a model / pipeline folder nor a bundled model"):
        tessera.load(tmp_path / "nothing")


def test_strict_loading_rejects_mismatched_config(tmp_path):
    export_model(build("vq-tiny"), tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["z_channels"] = 32
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_model(tmp_path / "m")


def test_lr_schedule_warmup_and_cosine():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_at(cfg, 0) == pytest.approx(0.1) and lr_at(cfg, 9) == pytest.approx(1.0)
    assert lr_at(cfg, 60) == pytest.approx(0.55) and lr_at(cfg, 110) == pytest.approx(0.1)


def test_batch_sampler_resumes_mid_epoch_and_shards_ranks():
    it = iter(StepBatchSampler(10, 3, seed=1))
    batches = [next(it) for _ in range(7)]
    again = iter(StepBatchSampler(10, 3, seed=1, start_step=4))
    assert [next(again) for _ in range(3)] == batches[4:]
    epoch0 = [i for b in batches[:3] for i, _ in b] + [batches[3][0][0]]
    assert sorted(epoch0) == list(range(10))  # each image once per epoch
    r0, r1 = iter(StepBatchSampler(10, 2, 1, rank=0, world=2)), iter(StepBatchSampler(10, 2, 1, rank=1, world=2))
    assert not {i for i, _ in next(r0)} & {i for i, _ in next(r1)}


def test_usage_tracker_counts_and_perplexity():
    u = UsageTracker(4, window=2)
    u.add(torch.tensor([0, 1, 2, 3]))
    s = u.stats()
    assert s["usage"] == 1.0 and s["perplexity"] == pytest.approx(4.0)
    u.add(torch.tensor([0, 0, 0, 0]))
    u.add(torch.tensor([0, 0, 0, 0]))  # window of 2: the uniform step has rolled out
    assert u.stats()["usage"] == 0.25 and u.dead().tolist() == [False, True, True, True]


def test_dead_codes_restart_after_step(tiny_dataset, tmp_path):
    tr = tiny_trainer(tiny_dataset, tmp_path / "r")
    task = tr.task
    task.usage.counts.zero_()
    task.usage.counts[:, 0] = 5
    task.usage.pos.fill_(2)
    before = task.model.quantizer.embedding.weight.detach().clone()
    x = torch.stack([task.dataset[(i, i)] for i in range(4)])
    out = task.after_step(x, step=1)
    assert out["restarted"] == task.model.config.codebook_size - 1
    after = task.model.quantizer.embedding.weight.detach()
    assert torch.equal(after[0], before[0]) and not torch.equal(after[1:], before[1:])


def test_half_precision_export_loads_into_fp32(tmp_path, seeded):
    m = build("vq-tiny").eval()
    export_model(m, tmp_path / "m", dtype=torch.float16)
    back = load_model(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "meta.json").read_text())["stored_dtype"] == "float16"
    assert next(back.parameters()).dtype == torch.float32
    x = torch.rand(1, 3, 32, 32, generator=seeded) * 2 - 1
    torch.testing.assert_close(back.decode_latents(m.encode_latents(x), quantize=False),
                               m.decode_latents(m.encode_latents(x), quantize=False), atol=5e-3, rtol=0)


def test_sigint_finishes_the_step_saves_and_resumes(tiny_dataset, tmp_path):
    import os
    import signal

    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when pytest runs in a background job
    tr = tiny_trainer(tiny_dataset, tmp_path / "s")
    original = tr.train_step

    def step_then_interrupt(batch):
        logs = original(batch)
        if tr.step == 1:  # the signal arrives during step 2 (index 1)
            os.kill(os.getpid(), signal.SIGINT)
        return logs

    tr.train_step = step_then_interrupt
    with pytest.raises(KeyboardInterrupt, match="stopped at step 2"):
        tr.fit(progress=False, resume=False)
    resumed = tiny_trainer(tiny_dataset, tmp_path / "s")
    assert resumed.resume() and resumed.step == 2
    assert signal.getsignal(signal.SIGINT) is before  # the handler is restored
