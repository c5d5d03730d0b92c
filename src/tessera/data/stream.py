"""Streaming training images from WebDataset shards, so a corpus never has to fit on one disk.

`urls` are what webdataset opens: local paths, brace patterns (`data/x/shards/shard-{00000..00099}.tar`),
`pipe:curl -s https://host/shard-{00000..00999}.tar` or http(s) URLs. The shards are the ones
`tessera data prepare` writes (or img2dataset's layout): `KEY.png|jpg` + `KEY.json` (its `split`) + `KEY.txt`.

Two ways to split the shards between the ranks of a torchrun job and the DataLoader workers of a rank:

    resampled (default)  every (rank, worker) draws shards at random with replacement from its own seed;
                         with a fixed epoch length per stream, every rank yields the same number of
                         samples, so ranks stay even however unevenly the shards divide
    exact                each shard read once per epoch: shards split by node (rank), then by worker;
                         needs at least world x workers shards (the ranks may see different counts)

Streaming runs resume at their step with a stream re-seeded from the step: not the exact samples an
uninterrupted run would have drawn (the map-style datasets resume exactly)."""
from __future__ import annotations

import json

import torch

from tessera.data.dataset import random_crop_flip


def shard_samples(urls: str | list[str], seed: int = 0, split: str | None = "train", resampled: bool = True):
    """The webdataset pipeline: (image [3,H,W] in [-1,1], caption, key) from the shards, one split."""
    import webdataset as wds

    from tessera.data.dataset import to_tensor

    if resampled:
        shards = [wds.ResampledShards(urls, seed=seed, deterministic=True)]  # per-stream seed: rank*1000+worker
    else:
        shards = [wds.SimpleShardList(urls), wds.split_by_node, wds.split_by_worker]

    def in_split(sample) -> bool:  # before decoding: the json entry is still bytes
        return split is None or json.loads(sample["json"]).get("split") == split

    def to_item(sample):
        image = next(sample[k] for k in ("png", "jpg", "jpeg", "webp") if k in sample)
        caption = sample.get("txt", "")  # decoded to str by wds.decode
        return to_tensor(image.convert("RGB")), caption, sample["__key__"]

    return wds.DataPipeline(*shards, wds.tarfile_to_samples(handler=wds.warn_and_continue), wds.select(in_split),
                            wds.decode("pil", handler=wds.warn_and_continue), wds.map(to_item))


class ImageStream(torch.utils.data.IterableDataset):
    """Random crops (and flips) of streamed images. One epoch = `epoch_samples` over all ranks and
    workers together: each (rank, worker) stream yields epoch_samples // (world x workers) in resampled
    mode (so every rank runs the same number of steps), one pass over its shards in exact mode."""

    def __init__(self, urls: str | list[str], epoch_samples: int, crop: int, flip: bool, seed: int = 0,
                 split: str | None = "train", resampled: bool = True):
        if epoch_samples < 1:
            raise ValueError(f"epoch_samples={epoch_samples}: must be >= 1")
        self.urls, self.epoch_samples, self.crop, self.flip = urls, epoch_samples, crop, flip
        self.seed, self.split, self.resampled = seed, split, resampled

    def reseed(self, seed: int) -> None:
        """The trainer re-seeds the stream from the step it resumes at."""
        self.seed = seed

    def __iter__(self):
        from webdataset.utils import pytorch_worker_info, pytorch_worker_seed

        _, world, _, workers = pytorch_worker_info()
        per_stream = self.epoch_samples // (world * workers)
        if per_stream < 1:
            raise ValueError(f"epoch_samples={self.epoch_samples} is fewer than the {world * workers} streams")
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + pytorch_worker_seed())
        samples = iter(shard_samples(self.urls, self.seed, self.split, self.resampled))
        n = 0
        for x, _, _ in samples:
            if self.resampled and n == per_stream:
                return
            if self.crop and min(x.shape[1:]) < self.crop:
                continue  # smaller than the crop: skipped
            n += 1
            yield random_crop_flip(x, self.crop, self.flip, g)
