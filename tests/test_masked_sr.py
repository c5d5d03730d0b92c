"""Muse's token super-resolution stage (generators/masked_sr.py, train/masked_sr.py, the masked pipeline's
`token_sr`): the network reads its low-resolution grid, trains on pairs of cached grids, and decodes a
pipeline's base grid into the grid of twice the size."""
import json

import torch
from test_cli import run

from tessera.registry import build


def test_the_sr_transformer_reads_its_low_grid_and_binds_it_for_guidance():
    from tessera.generators.masked_sr import WithLow

    torch.manual_seed(0)
    m = build("masked-sr-tiny").eval()
    hi = torch.full((2, 64), m.config.mask_id)
    low = torch.randint(0, 64, (2, 16))
    cond, mask = torch.randn(2, 5, 16), torch.ones(2, 5, dtype=torch.bool)
    with torch.no_grad():
        logits = m(hi, cond, mask, low=low)
        assert logits.shape == (2, 64, 64) and torch.isfinite(logits).all()
        assert (m(hi, cond, mask, low=low.flip(0)) - logits).abs().max() > 1e-3  # the low grid matters
        drop = torch.tensor([False, False, True, True])  # CFG doubles the batch: the low grids follow
        both = WithLow(m, low)(torch.cat([hi, hi]), torch.cat([cond, cond]), torch.cat([mask, mask]), drop)
        torch.testing.assert_close(both[:2], logits)
        assert (both[2:] - logits).abs().max() > 1e-4  # the null prompt


def test_train_export_and_decode_through_a_masked_pipelines_token_sr_stage(tiny_dataset, tiny_model, tmp_path):
    """`tessera train masked_sr` on the grids of the images (8x8) and of the images at half size (4x4), its
    held-out NLLs; then a masked pipeline with 4x4 base grids decodes through it into 8x8 (32² instead of 16²),
    `sr_steps=0` skips it, and the pipeline folder (`tessera pipeline save --token-sr`) keeps it."""
    import tessera
    from tessera.checkpoint import export_model

    r = run("train", "masked_sr", "--data", tiny_dataset, "--out", tmp_path / "sr", "--preset", "masked-sr-tiny",
            "--tokenizer", tiny_model, "--text-encoder", "tiny", "--max-steps", "3", "--set", "train.batch_size=4",
            "--set", "train.val_every=3")
    assert r.exit_code == 0, r.output
    log = [json.loads(line) for line in (tmp_path / "sr" / "log.jsonl").read_text().splitlines()]
    val = [row for row in log if "val/val_nll_r1" in row]
    assert val and val[-1]["val/val_nll_r1"] > 0 and "val/low_margin_r0.5" in val[-1]
    spec = json.loads((tmp_path / "sr" / "run.json").read_text())
    assert spec["model"]["grid"] == [8, 8] and spec["model"]["low_grid"] == [4, 4]
    assert run("export", tmp_path / "sr", "-o", tmp_path / "srm").exit_code == 0
    torch.manual_seed(1)
    export_model(build("masked-tiny", grid=(4, 4)), tmp_path / "base")
    r = run("pipeline", "save", "--paradigm", "masked", "--model", tmp_path / "base", "--tokenizer", tiny_model,
            "--text-encoder", "tiny", "--token-sr", tmp_path / "srm", "-o", tmp_path / "pipe")
    assert r.exit_code == 0, r.output
    pipe = tessera.load(str(tmp_path / "pipe"), dtype="float32")
    assert pipe.token_sr is not None and pipe.native_size == 32

    def draw(p, **kw):
        return p("a red fox", num_inference_steps=3, generator=torch.Generator().manual_seed(3), output_type="pt", **kw)

    out = draw(pipe, sr_steps=2)
    assert out.images.shape == (1, 3, 32, 32) and out.parameters["sr_steps"] == 2
    assert draw(pipe, sr_steps=0).images.shape == (1, 3, 16, 16)
    pipe.save_pretrained(tmp_path / "again")
    torch.testing.assert_close(draw(tessera.load(str(tmp_path / "again"), dtype="float32"), sr_steps=2).images,
                               out.images)
    r = run("pipeline", "save", "--paradigm", "masked", "--token-sr", tmp_path / "srm", "-o", tmp_path / "bad")
    assert r.exit_code != 0 and "token SR stage" in r.output and not (tmp_path / "bad").exists()
