"""The CPU speed paths are lossless: oneDNN-prepacked layers give the plain layers' outputs and unpack to the
exact weights; the GEMM attention path agrees with SDPA within bf16 rounding; an SD pipeline with them
draws the plain pipeline's image (bf16)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tessera.nn import onednn
from tessera.nn.kernels import attend, gemm_attention

pytestmark = pytest.mark.skipif(not onednn.available(), reason="needs torch's oneDNN (mkldnn) ops")


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.lin = nn.Linear(16, 24)

    def forward(self, x):
        h = self.conv2(F.silu(self.conv1(x)))
        return self.lin(h.flatten(2).transpose(1, 2))  # (B, HW, 24)


def _net():
    torch.manual_seed(0)
    return _Net().eval()


def test_packed_layers_equal_the_plain_ones_and_unpack_exactly():
    net = _net().to(torch.bfloat16, memory_format=torch.channels_last)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    inputs = [torch.randn(b, 8, s, s, dtype=torch.bfloat16) for b, s in ((1, 16), (2, 12), (3, 32))]
    with torch.no_grad():
        want = [net(x) for x in inputs]
        assert onednn.pack(net) == 3 and onednn.is_packed(net)
        assert net.conv1.weight.numel() == 0  # one copy of the weights: the packed one
        for x, w in zip(inputs, want):
            torch.testing.assert_close(net(x), w, atol=1e-2, rtol=1e-2)
    assert onednn.unpack(net) == 3 and not onednn.is_packed(net)
    after = net.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert onednn.pack(_net()) == 0  # float32 layers are left as they are


def test_gemm_attention_agrees_with_sdpa_within_bf16_rounding():
    g = torch.Generator().manual_seed(0)
    for shape_q, shape_k in (((1, 2, 300, 32), (1, 2, 300, 32)), ((2, 3, 1100, 16), (2, 3, 77, 16))):
        q = torch.randn(shape_q, generator=g) * 2
        k, v = torch.randn(shape_k, generator=g) * 2, torch.randn(shape_k, generator=g)
        exact = F.scaled_dot_product_attention(q, k, v)
        torch.testing.assert_close(gemm_attention(q, k, v, tile=128), exact, atol=1e-5, rtol=1e-5)  # fp32: same
        qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
        err_sdpa = (F.scaled_dot_product_attention(qb, kb, vb).float() - exact).abs().max()
        for impl in ("gemm", "auto"):
            err = (attend(qb, kb, vb, impl).float() - exact).abs().max()
            assert err <= max(4 * err_sdpa, 0.05), (impl, err, err_sdpa)
    with pytest.raises(ValueError, match="attention"):
        attend(q, k, v, "fast")


def test_an_sd_pipeline_draws_the_same_image_with_each_speed_option(tmp_path):
    import diffusers
    from test_stable_diffusion import tiny_components

    import tessera

    tokenizer, text, unet, vae = tiny_components(in_channels=4)
    diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                      scheduler=diffusers.EulerDiscreteScheduler(), safety_checker=None,
                                      feature_extractor=None, requires_safety_checker=False).save_pretrained(tmp_path)
    pipe = tessera.load(str(tmp_path), dtype="bfloat16")
    assert onednn.is_packed(pipe.generator) and onednn.is_packed(pipe.tokenizer)

    def image():
        return pipe("a cat", num_inference_steps=2, guidance_scale=3.0, output_type="np",
                    generator=torch.Generator().manual_seed(4)).images[0]

    packed = image()
    rounding = np.abs(_image_of(tessera.load(str(tmp_path), dtype="float32")) - packed).max()  # bf16 vs fp32
    plain = image() if pipe.set_speed(prepack=False) else None
    assert not onednn.is_packed(pipe.generator)
    gemm = image() if pipe.set_speed(attention="gemm") else None
    for other in (plain, gemm):
        assert np.abs(other - packed).max() <= 1.5 * rounding + 2 / 255, (np.abs(other - packed).max(), rounding)
    pipe.set_speed(prepack=True, attention="sdpa")
    pipe.save_pretrained(tmp_path / "saved")  # saving unpacks, then packs again
    assert onednn.is_packed(pipe.generator) and np.abs(image() - packed).max() == 0
    assert np.abs(_image_of(tessera.load(str(tmp_path / "saved"), dtype="bfloat16")) - packed).max() == 0


def _image_of(pipe):
    return pipe("a cat", num_inference_steps=2, guidance_scale=3.0, output_type="np",
                generator=torch.Generator().manual_seed(4)).images[0]


def test_token_merging_equals_tomesd_and_is_reproducible():
    """ToMe in Tessera's blocks gives tomesd's patched diffusers U-Net output (its deterministic top-left
    partition); the random partition is seeded per call, so the same input gives the same output."""
    import diffusers
    import tomesd
    from test_stable_diffusion import _perturb

    from tessera.generators.sd_unet import SDUNet, SDUNetConfig

    torch.manual_seed(0)
    ref = _perturb(diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, cross_attention_dim=32, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2, norm_num_groups=8))
    ours = SDUNet(SDUNetConfig.from_diffusers(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict())
    holder = diffusers.StableDiffusionPipeline(
        vae=diffusers.AutoencoderTiny(encoder_block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4),
        text_encoder=None, tokenizer=None, unet=ref, scheduler=diffusers.DDIMScheduler(), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    x, t, ctx = torch.randn(2, 4, 16, 16), torch.tensor([500, 500]), torch.randn(2, 7, 32)
    with torch.no_grad():
        plain = ours(x, t, ctx)
        tomesd.apply_patch(holder, ratio=0.5, use_rand=False)
        want = ref(x, t, encoder_hidden_states=ctx).sample
        ours.set_tome(0.5, random=False)
        got = ours(x, t, ctx)
        assert (want - plain).abs().max() > 1e-3  # merging changes the output ...
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)  # ... exactly as tomesd does
        ours.set_tome(0.5)
        assert torch.equal(ours(x, t, ctx), ours(x, t, ctx))
        ours.set_tome(0.0)
        assert torch.equal(ours(x, t, ctx), plain)
    with pytest.raises(ValueError, match="tome"):
        ours.set_tome(1.0)


def test_the_speed_switches_reach_an_sd_pipeline_through_generate_and_serve(tmp_path):
    import diffusers
    from click.testing import CliRunner
    from test_stable_diffusion import tiny_components

    from tessera.cli import main
    from tessera.pipelines.records import read_record

    tokenizer, text, unet, vae = tiny_components(in_channels=4)
    diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                      scheduler=diffusers.EulerDiscreteScheduler(), safety_checker=None,
                                      feature_extractor=None, requires_safety_checker=False).save_pretrained(tmp_path / "p")
    args = ["generate", "a cat", "--model", str(tmp_path / "p"), "--size", "64", "--steps", "2", "--seed", "1"]
    r = CliRunner().invoke(main, [*args, "--attention", "gemm", "--tome", "0.5", "-o", str(tmp_path / "x.png")])
    assert r.exit_code == 0, r.output
    assert read_record(tmp_path / "x.png")["speed"] == {"attention": "gemm", "tome": 0.5}
    r = CliRunner().invoke(main, [*args, "--tome", "1.5", "-o", str(tmp_path / "y.png")])
    assert r.exit_code != 0 and "tome" in r.output and not (tmp_path / "y.png").exists()
    r = CliRunner().invoke(main, ["generate", "a cat", "--paradigm", "masked", "--tome", "0.5", "-o",
                                  str(tmp_path / "z.png")])
    assert r.exit_code != 0 and "Stable Diffusion" in r.output and "Traceback" not in r.output


def test_safetensors_are_read_into_private_memory_equal_to_the_library(tmp_path):
    from safetensors.torch import load_file, save_file

    from tessera.checkpoint import CheckpointError, read_safetensors

    state = {"a": torch.randn(3, 5), "b": torch.randn(7).half(), "c": torch.arange(6).reshape(2, 3),
             "d": torch.randn(2, 2).bfloat16(), "e": torch.tensor([True, False])}
    save_file(state, tmp_path / "w.safetensors", metadata={"kind": "x"})
    got, want = read_safetensors(tmp_path / "w.safetensors"), load_file(str(tmp_path / "w.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) and got[k].dtype == want[k].dtype
                                             for k in want)
    cast = read_safetensors(tmp_path / "w.safetensors", torch.bfloat16)
    assert cast["a"].dtype == cast["b"].dtype == torch.bfloat16 and cast["c"].dtype == torch.int64
    data = (tmp_path / "w.safetensors").read_bytes()
    for bad in (data[:-3], b"\x00" * 4, data[:8] + b"[" + data[9:], data[:8] + data[8:].replace(b"F32", b"X32", 1)):
        (tmp_path / "bad.safetensors").write_bytes(bad)
        with pytest.raises(CheckpointError, match="bad.safetensors"):
            read_safetensors(tmp_path / "bad.safetensors")
