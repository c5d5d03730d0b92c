"""The bundled default tokenizer: loads with nothing else, verifies, and reconstructs."""
import numpy as np
from click.testing import CliRunner
from PIL import Image

import tessera
from conftest import photo_like
from tessera.cli import main
from tessera.data.dataset import to_tensor
from tessera.eval.metrics import psnr


def test_bundled_vq_f8_loads_and_round_trips(tmp_path):
    vq = tessera.load("vq-f8")
    assert vq.meta["kind"] == "vq" and vq.factor == 8 and vq.config.codebook_size == 8192
    smooth = photo_like(3, (128, 128)).resize((32, 32)).resize((128, 128), Image.Resampling.BICUBIC)
    x = to_tensor(smooth)[None]
    tokens = vq.encode(x)
    assert tokens.shape == (1, 16, 16)
    rec = vq.decode_tokens(tokens).clamp(-1, 1)
    assert float(psnr(rec, x)) > 17.0  # the same net with random weights: ~13 dB
    smooth.save(tmp_path / "photo.png")
    r = CliRunner().invoke(main, ["reconstruct", str(tmp_path / "photo.png"), "-o", str(tmp_path / "out.png")])
    assert r.exit_code == 0, r.output
    assert np.asarray(Image.open(tmp_path / "out.png")).shape == (128, 128, 3)
