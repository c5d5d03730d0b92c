"""Streaming WebDataset shards: split by node and by worker, resampled with a fixed epoch so ranks stay even,
and the tokenizer trainer on a stream under torchrun."""
import io
import json
import os
import subprocess
import sys
import tarfile

import pytest
import torch

from conftest import free_port, photo_like, tiny_preset
from tessera.data.stream import ImageStream, shard_samples


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """4 shards x 6 samples (5 train + 1 val each), the layout `data prepare` writes."""
    root = tmp_path_factory.mktemp("shards")
    for s in range(4):
        with tarfile.open(root / f"shard-{s:05d}.tar", "w") as tf:
            for i in range(6):
                key = f"{s:02d}{i:04d}"
                buf = io.BytesIO()
                photo_like(100 * s + i, (40, 40)).save(buf, "PNG")
                meta = json.dumps({"key": key, "split": "val" if i == 5 else "train"}).encode()
                for ext, data in (("png", buf.getvalue()), ("json", meta), ("txt", f"picture {key}".encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    return str(root / "shard-{00000..00003}.tar")


def as_rank(monkeypatch, rank, world):
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))


def test_exact_mode_splits_shards_by_node_and_worker(shards, monkeypatch):
    seen = {}
    for rank in (0, 1):
        as_rank(monkeypatch, rank, 2)
        seen[rank] = [key for _, _, key in shard_samples(shards, resampled=False)]
    assert len(seen[0]) == len(seen[1]) == 10  # 2 shards x 5 train samples each
    assert not set(seen[0]) & set(seen[1])  # disjoint: each shard read by one rank
    assert all(not k.endswith("0005") for k in seen[0] + seen[1])  # the val sample of each shard is skipped


def test_resampled_streams_give_every_rank_and_worker_the_same_count(shards, monkeypatch):
    counts, firsts = {}, {}
    for rank in (0, 1):
        as_rank(monkeypatch, rank, 2)
        ds = ImageStream(shards, epoch_samples=24, crop=32, flip=True, seed=3)
        loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)
        batches = list(loader)
        counts[rank] = sum(len(b) for b in batches)
        firsts[rank] = batches[0]
        assert batches[0].shape == (2, 3, 32, 32)
    assert counts == {0: 12, 1: 12}  # 24 per epoch = 2 ranks x 2 workers x 6
    assert not torch.equal(firsts[0], firsts[1])  # each rank draws its own stream
    as_rank(monkeypatch, 0, 2)
    again = next(iter(torch.utils.data.DataLoader(ImageStream(shards, 24, 32, True, seed=3), batch_size=2,
                                                  num_workers=2)))
    assert torch.equal(again, firsts[0])  # seeded: the same stream again
    with pytest.raises(ValueError, match="fewer than"):
        next(iter(ImageStream(shards, 1, 32, True)))


def test_tokenizer_trains_on_a_stream_under_torchrun(tiny_dataset, shards, tmp_path):
    args = ["train", "tokenizer", "--data", str(tiny_dataset), "--out", str(tmp_path / "run"), "--preset", tiny_preset("vq-tiny"),
            "--max-steps", "3", "--set", "task.crop=16", "--set", "task.loss.perceptual_backbone=\"none\"",
            "--set", "train.batch_size=2", "--set", "train.val_every=0", "--set", "task.val_images=2",
            "--set", f"task.stream=\"{shards}\"", "--set", "task.stream_epoch=8", "--set", "train.log_every=1"]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        f"--master_port={free_port()}", "-m", "tessera.cli", *args],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    # epoch of 8 = 2 steps x 2 ranks x batch 2: step 3 runs in the second epoch on both ranks
    assert [row["step"] for row in log] == [1, 2, 3] and all(row["loss"] > 0 for row in log)


def test_sr_trains_on_a_stream_and_refuses_the_tokenizer_degradation(tiny_dataset, shards, tmp_path):
    from click.testing import CliRunner

    from tessera.cli import main

    args = ["train", "sr", "--data", str(tiny_dataset), "--out", str(tmp_path / "sr"), "--preset", tiny_preset("sr-tiny"),
            "--max-steps", "2", "--set", "task.crop=16", "--set", "train.batch_size=4", "--set", "train.val_every=0",
            "--set", f"task.stream=\"{shards}\"", "--set", "task.stream_epoch=8"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code != 0 and "bicubic only" in r.output  # the default --tokenizer vq-f8 is refused
    r = CliRunner().invoke(main, [*args, "--tokenizer", ""])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "sr" / "log.jsonl").read_text().splitlines()[-1])["step"] == 2
