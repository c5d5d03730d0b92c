"""taming-transformers' VQGAN: a small random release folder (configs/model.yaml + checkpoints/last.ckpt with a
state_dict, as its Lightning trainer writes) loads with `tessera.load(DIR)` into Tessera's TamingVQGAN, and the
tokens and decoded images equal those of taming's own Encoder / Decoder / VectorQuantizer (the 2021 wheel,
unpacked by scripts/setup.sh into .venv/taming-reference)."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import tessera
from tessera.errors import WrongModelError

REF = Path(__file__).resolve().parents[1] / ".venv" / "taming-reference"
DD = dict(double_z=False, z_channels=16, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2, 2],
          num_res_blocks=1, attn_resolutions=[16], dropout=0.0)


def reference(module: str):
    """A module of the taming-transformers wheel in .venv/taming-reference (skips the test without it)."""
    import importlib

    if not (REF / "taming").is_dir():
        pytest.skip("scripts/setup.sh unpacks taming-transformers into .venv/taming-reference")
    sys.path.insert(0, str(REF))
    try:
        return importlib.import_module(module)
    finally:
        sys.path.remove(str(REF))


@pytest.fixture(scope="module")
def taming():
    model = reference("taming.modules.diffusionmodules.model")
    return model.Encoder, model.Decoder, reference("taming.modules.vqvae.quantize").VectorQuantizer


def _release(root: Path, taming, n_embed: int = 64, embed_dim: int = 8):
    import yaml

    Encoder, Decoder, VectorQuantizer = taming
    torch.manual_seed(0)
    nets = {"encoder": Encoder(**DD), "decoder": Decoder(**DD), "quantize": VectorQuantizer(n_embed, embed_dim, 0.25),
            "quant_conv": torch.nn.Conv2d(16, embed_dim, 1), "post_quant_conv": torch.nn.Conv2d(embed_dim, 16, 1)}
    with torch.no_grad():
        for net in nets.values():
            for p in net.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    state = {f"{name}.{k}": v for name, net in nets.items() for k, v in net.state_dict().items()}
    state["loss.discriminator.main.0.weight"] = torch.randn(4, 3, 4, 4)  # the GAN's, left out with a message
    (root / "configs").mkdir(parents=True)
    (root / "checkpoints").mkdir()
    config = {"model": {"base_learning_rate": 4.5e-6, "target": "taming.models.vqgan.VQModel",
                        "params": {"embed_dim": embed_dim, "n_embed": n_embed, "ddconfig": DD,
                                   "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator"}}}}
    (root / "configs" / "model.yaml").write_text(yaml.safe_dump(config))
    torch.save({"state_dict": state, "global_step": 10, "epoch": 1}, root / "checkpoints" / "last.ckpt")
    return {name: net.eval() for name, net in nets.items()}


def test_a_taming_release_gives_tamings_tokens_and_images(taming, tmp_path):
    ref = _release(tmp_path / "vqgan", taming)
    with pytest.warns(UserWarning, match="loss"):
        vq = tessera.load(str(tmp_path / "vqgan"), dtype=torch.float32)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        z_q, _, (_, _, idx) = ref["quantize"](ref["quant_conv"](ref["encoder"](x)))
        want_tokens = idx.reshape(2, 8, 8)
        tokens = vq.encode(x)
        assert tokens.shape == (2, 8, 8) and torch.equal(tokens, want_tokens)
        want = ref["decoder"](ref["post_quant_conv"](z_q))
        got = vq.decode_tokens(tokens)
    assert np.abs((got - want).numpy()).max() <= 2 / 255 and len(tokens.unique()) > 1
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_a_release_that_does_not_fit_or_holds_more_than_tensors_is_one_clear_error(taming, tmp_path):
    import yaml

    _release(tmp_path / "a", taming)
    config = yaml.safe_load((tmp_path / "a" / "configs" / "model.yaml").read_text())
    config["model"]["params"]["n_embed"] = 128
    (tmp_path / "a" / "configs" / "model.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(WrongModelError, match="do not fit"):
        tessera.load(str(tmp_path / "a"))
    _release(tmp_path / "b", taming)
    state = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt")
    torch.save({**state, "callbacks": {"cb": Path("x")}}, tmp_path / "b" / "checkpoints" / "last.ckpt")  # an object
    with pytest.raises(WrongModelError, match="trust-pickle"):
        tessera.load(str(tmp_path / "b"))
    # the user who trusts the file converts it once; safetensors from then on
    from click.testing import CliRunner

    from tessera.cli import main

    args = ["convert", str(tmp_path / "b"), "-o", str(tmp_path / "m")]
    r = CliRunner().invoke(main, args)
    assert r.exit_code != 0 and "--trust-pickle" in r.output and not (tmp_path / "m").exists()
    r = CliRunner().invoke(main, [*args, "--trust-pickle"])
    assert r.exit_code == 0, r.output
    assert tessera.load(str(tmp_path / "m")).kind == "taming-vq"


def test_convert_writes_a_release_as_a_safetensors_model_folder(taming, tmp_path):
    from click.testing import CliRunner

    from tessera.cli import main

    _release(tmp_path / "vqgan", taming)
    r = CliRunner().invoke(main, ["convert", str(tmp_path / "vqgan"), "-o", str(tmp_path / "m"), "--dtype", "float32"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "m" / "model.safetensors").is_file() and not list((tmp_path / "m").glob("*.ckpt"))
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with pytest.warns(UserWarning):
        original = tessera.load(str(tmp_path / "vqgan"))
    converted = tessera.load(str(tmp_path / "m"))
    assert converted.kind == "taming-vq" and torch.equal(converted.encode(x), original.encode(x))


@pytest.mark.parametrize("n_unmasked,prepend", [(0, False), (3, True)])
def test_the_stage_two_transformer_gives_tamings_logits(n_unmasked, prepend):
    GPT = reference("taming.modules.transformer.mingpt").GPT
    from tessera.checkpoint import load_strict
    from tessera.generators.taming_gpt import TamingGPT, TamingGPTConfig

    torch.manual_seed(0)
    ref = GPT(vocab_size=50, block_size=20, n_layer=2, n_head=4, n_embd=32, n_unmasked=n_unmasked).eval()
    with torch.no_grad():
        ref.pos_emb.normal_()
    ours = load_strict(TamingGPT(TamingGPTConfig(vocab_size=50, block_size=20, n_layer=2, n_head=4, n_embd=32,
                                                 n_unmasked=n_unmasked)), ref.state_dict(), Path("gpt")).eval()
    ids = torch.randint(0, 50, (2, 12))
    emb = torch.randn(2, 3, 32) if prepend else None
    with torch.no_grad():
        want, _ = ref(ids, embeddings=emb)
        got = ours(ids, embeddings=emb)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        later = ids.clone()
        later[:, 8:] = (later[:, 8:] + 1) % 50
        k = 8 + (3 if prepend else 0)
        torch.testing.assert_close(ours(later, embeddings=emb)[:, :k], got[:, :k])  # causal: the past is unchanged
    with pytest.raises(ValueError, match="block size"):
        ours(torch.zeros(1, 21, dtype=torch.long))


def test_sliding_window_sampling_is_plain_sampling_when_the_grid_fits_and_tamings_window_otherwise():
    from tessera.generators.taming_gpt import TamingGPT, TamingGPTConfig
    from tessera.sampling.window import _window_start, sample_grid

    torch.manual_seed(0)
    gpt = TamingGPT(TamingGPTConfig(vocab_size=30, block_size=17, n_layer=2, n_head=2, n_embd=16)).eval()
    cond = torch.tensor([[7], [3]])  # a class / SOS id per row
    with torch.no_grad():
        ids = sample_grid(gpt, cond, (4, 4), 4, generator=torch.Generator().manual_seed(5), temperature=1.0)
        g, x = torch.Generator().manual_seed(5), cond
        for _ in range(16):  # taming's Net2NetTransformer.sample: the whole sequence, the last position's logits
            probs = gpt(x)[:, -1].softmax(-1)
            x = torch.cat([x, torch.multinomial(probs, 1, generator=g)], dim=1)
    assert torch.equal(ids.reshape(2, 16), x[:, 1:])
    for size, w in ((16, 8), (7, 4), (9, 4)):  # taming's window rule (scripts/sample_conditional.py)
        half = w // 2
        for i in range(size):
            local = i if i <= half else (w - (size - i) if size - i < half else half)
            assert _window_start(i, size, w) == i - local
    with torch.no_grad():
        big = sample_grid(gpt, cond, (6, 5), 4, generator=torch.Generator().manual_seed(1))
        again = sample_grid(gpt, cond, (6, 5), 4, generator=torch.Generator().manual_seed(1))
    assert big.shape == (2, 6, 5) and torch.equal(big, again) and 0 <= big.min() and big.max() < 30
    with pytest.raises(ValueError, match="window"):
        sample_grid(gpt, cond, (3, 3), 4, generator=torch.Generator())


def _net2net_release(root: Path, taming, cond: dict, n_embed: int = 64):
    """A Net2NetTransformer release: the VQGAN of `_release` as first_stage_model + a small GPT."""
    import yaml

    from tessera.generators.taming_gpt import TamingGPT, TamingGPTConfig

    vq_root = root.parent / (root.name + "-vq")
    nets = _release(vq_root, taming, n_embed=n_embed)
    torch.manual_seed(3)
    gpt = TamingGPT(TamingGPTConfig(vocab_size=n_embed, block_size=65, n_layer=2, n_head=2, n_embd=32))
    state = {f"first_stage_model.{name}.{k}": v for name, net in nets.items() for k, v in net.state_dict().items()}
    state.update({f"transformer.{k}": v for k, v in gpt.state_dict().items()})
    vq_params = yaml.safe_load((vq_root / "configs" / "model.yaml").read_text())["model"]["params"]
    (root / "configs").mkdir(parents=True)
    (root / "checkpoints").mkdir()
    config = {"model": {"target": "taming.models.cond_transformer.Net2NetTransformer", "params": {
        "transformer_config": {"target": "taming.modules.transformer.mingpt.GPT", "params": {
            "vocab_size": n_embed, "block_size": 65, "n_layer": 2, "n_head": 2, "n_embd": 32}},
        "first_stage_config": {"target": "taming.models.vqgan.VQModel", "params": vq_params},
        "cond_stage_config": cond}}}
    (root / "configs" / "model.yaml").write_text(yaml.safe_dump(config))
    torch.save({"state_dict": state}, root / "checkpoints" / "last.ckpt")
    return gpt.eval(), nets


def test_a_taming_transformer_release_draws_class_conditional_images_at_any_size(taming, tmp_path):
    gpt, nets = _net2net_release(tmp_path / "c2i", taming, {"target": "taming.modules.util.Labelator",
                                                             "params": {"n_classes": 10}})
    pipe = tessera.load(str(tmp_path / "c2i"), dtype=torch.float32)
    assert type(pipe).__name__ == "TamingPipeline" and pipe.native_size == 32 and pipe.window == 8
    out = pipe(class_label=3, num_images_per_prompt=2, generator=torch.Generator().manual_seed(4), output_type="pt")
    tokens = pipe(class_label=3, num_images_per_prompt=2, generator=torch.Generator().manual_seed(4),
                  output_type="latent").images
    g, x = torch.Generator().manual_seed(4), torch.full((2, 1), 3)
    with torch.no_grad():
        for _ in range(64):  # taming's sampling loop, by hand
            x = torch.cat([x, torch.multinomial(gpt(x)[:, -1].softmax(-1), 1, generator=g)], dim=1)
        z = nets["quantize"].embedding(x[:, 1:].reshape(2, 8, 8)).permute(0, 3, 1, 2)
        want = nets["decoder"](nets["post_quant_conv"](z)).clamp(-1, 1).add(1).div(2)
    assert torch.equal(tokens.reshape(2, 64), x[:, 1:])
    torch.testing.assert_close(out.images, want, atol=1e-4, rtol=1e-4)
    big = pipe(class_label=3, generator=torch.Generator().manual_seed(4), height=48, width=64).images[0]
    assert big.size == (64, 48)  # a 12 x 16 token grid through the sliding 8 x 8 window
    with pytest.raises(Exception, match="class_label"):
        pipe(class_label=10)


def test_the_whole_system_runs_a_class_conditional_release(taming, tmp_path):
    """`tessera generate --model DIR --class-label N` and `tessera serve --model DIR` with `class_label`: the
    release is the ar paradigm's pipeline; the class is recorded; a missing or out-of-range class, or a class
    for a model without classes, is one clear error and nothing is written."""
    from click.testing import CliRunner
    from fastapi.testclient import TestClient

    from tessera.cli import main
    from tessera.pipelines.records import read_record
    from tessera.serve.app import ServeConfig, create_app

    folder = tmp_path / "c2i"
    _net2net_release(folder, taming, {"target": "taming.modules.util.Labelator", "params": {"n_classes": 10}})
    run = ["generate", "a dog", "--model", str(folder), "--size", "64", "--seed", "2", "--dtype", "float32"]
    r = CliRunner().invoke(main, [*run, "--class-label", "7", "-o", str(tmp_path / "x.png")])
    assert r.exit_code == 0, r.output
    record = read_record(tmp_path / "x.png")
    assert record["class_label"] == 7 and record["paradigm"] == "ar" and record["model"] == str(folder)
    for extra, rule in ((["--class-label", "10"], "class_label=10"), ([], "class_label=None")):
        r = CliRunner().invoke(main, [*run, *extra, "-o", str(tmp_path / "y.png")])
        assert r.exit_code != 0 and rule in r.output and "Traceback" not in r.output and not (tmp_path / "y.png").exists()
    r = CliRunner().invoke(main, ["generate", "a dog", "--paradigm", "ar", "--class-label", "3", "-o", str(tmp_path / "z.png")])
    assert r.exit_code != 0 and "class_label" in r.output and not (tmp_path / "z.png").exists()
    app = create_app(ServeConfig(data_dir=str(tmp_path / "serve"), models={"ar": str(folder)}, preload=("ar",),
                                 dtype="float32"))
    with TestClient(app) as c:
        body = {"prompt": "a dog", "size": "128x128", "seed": 3, "paradigm": "ar", "class_label": 4}
        r = c.post("/v1/images/generations", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["tessera"]["model"] == str(folder)
        r = c.post("/v1/images/generations", json={**body, "class_label": 12})
        assert r.status_code == 400 and "class_label" in r.text
