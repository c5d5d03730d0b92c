import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tessera.registry import build
from tessera.tokenizer.losses import PatchDiscriminator, VQLoss, VQLossConfig, adaptive_weight, hinge_d_loss
from tessera.tokenizer.perceptual import PerceptualLoss, VGG16Features, load_open_nsfw, open_nsfw_onnx_path
from tessera.tokenizer.vq import VectorQuantizer


def test_shapes_and_api(seeded):
    m = build("vq-tiny").eval()
    x = torch.rand(2, 3, 32, 48, generator=seeded) * 2 - 1
    tokens = m.encode(x)
    assert tokens.shape == (2, 8, 12) and tokens.dtype == torch.int64
    assert 0 <= int(tokens.min()) and int(tokens.max()) < m.config.codebook_size
    img = m.decode_tokens(tokens)
    assert img.shape == x.shape and torch.isfinite(img).all()
    lat = m.encode_latents(x)
    assert lat.shape == (2, m.config.codebook_dim, 8, 12)
    torch.testing.assert_close(lat.norm(dim=1), torch.ones(2, 8, 12))
    # decoding quantized latents == decoding their tokens
    torch.testing.assert_close(m.decode_latents(lat), img)


def test_bad_input_rejected():
    m = build("vq-tiny")
    with pytest.raises(ValueError, match="multiple of factor"):
        m.encode(torch.zeros(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"\[B,3,H,W\]"):
        m.encode(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="token ids"):
        m.decode_tokens(torch.full((1, 2, 2), 10_000))


def test_quantizer_picks_nearest_code_and_straight_through(seeded):
    q = VectorQuantizer(50, 4, beta=0.25, l2_normalize=False)
    z = torch.randn(2, 4, 3, 3, generator=seeded, requires_grad=True)
    out, loss, tokens = q(z)
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 4)
    brute = torch.cdist(flat, q.embedding.weight.detach()).argmin(1).reshape(2, 3, 3)
    assert torch.equal(tokens, brute)
    torch.testing.assert_close(out.detach(), q.embed(tokens))
    out.sum().backward()  # straight-through: d out / d z = identity
    assert torch.allclose(z.grad, torch.ones_like(z.grad))
    e = q.embed(tokens)
    torch.testing.assert_close(loss, torch.mean((e - z.detach()) ** 2) * 1.25)


def test_training_step_reduces_loss(seeded):
    from conftest import photo_like
    from tessera.data.dataset import to_tensor

    m = build("vq-tiny")
    x = torch.stack([to_tensor(photo_like(i, (32, 32))) for i in range(4)])
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        rec, ql, _ = m(x)
        loss = (rec - x).abs().mean() + ql
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_open_nsfw_port_matches_onnxruntime(seeded):
    """Our PyTorch ResNet-50 with weights read from the ONNX file == onnxruntime on the same file."""
    ort = pytest.importorskip("onnxruntime")
    net = load_open_nsfw()
    x = torch.rand(2, 3, 224, 224, generator=seeded) * 2 - 1
    sess = ort.InferenceSession(str(open_nsfw_onnx_path()), providers=["CPUExecutionProvider"])
    ref = sess.run(None, {"input:0": net.preprocess(x).permute(0, 2, 3, 1).numpy()})[0]
    with torch.no_grad():
        ours = torch.softmax(net(x), -1).numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_perceptual_distance_properties(seeded):
    p = PerceptualLoss.open_nsfw(pretrained=False)
    x = torch.rand(2, 3, 64, 64, generator=seeded) * 2 - 1
    assert torch.allclose(p(x, x), torch.zeros(2), atol=1e-6)
    near = p(x, x + 0.02 * torch.randn(x.shape, generator=seeded))
    far = p(x, -x)
    assert (far > near).all() and (near > 0).all()


def test_vgg16_lpips_loads_torchvision_layout(tmp_path, seeded):
    state = {f"features.{k}": v for k, v in VGG16Features().features.state_dict().items()}
    save_file(state, tmp_path / "vgg.safetensors")
    p = PerceptualLoss.vgg16(tmp_path / "vgg.safetensors")
    x = torch.rand(1, 3, 64, 64, generator=seeded) * 2 - 1
    assert p(x, x.flip(-1)).shape == (1,)
    with pytest.raises(FileNotFoundError, match="VGG16 weights not found"):
        PerceptualLoss.vgg16(tmp_path / "missing.safetensors")


def test_adaptive_weight_formula(seeded):
    w = torch.randn(3, 3, requires_grad=True, generator=seeded)
    x = torch.randn(3, generator=seeded)
    rec = (w @ x).pow(2).sum()
    g = (w @ x).sum() * 5
    lam = adaptive_weight(rec, g, w, 1e4)
    expect = torch.autograd.grad(rec, w, retain_graph=True)[0].norm() / (
        torch.autograd.grad(g, w, retain_graph=True)[0].norm() + 1e-6)
    torch.testing.assert_close(lam, expect)


def test_discriminator_and_hinge():
    d = PatchDiscriminator(ch=8, n_layers=3)
    out = d(torch.zeros(2, 3, 64, 64))
    assert out.shape[:2] == (2, 1) and out.shape[-1] > 1  # a grid of patch logits
    assert hinge_d_loss(torch.full((4,), 2.0), torch.full((4,), -2.0)) == 0
    assert hinge_d_loss(torch.zeros(4), torch.zeros(4)) == 1


def test_gan_switches_on_at_disc_start(seeded):
    m = build("vq-tiny")
    loss = VQLoss(VQLossConfig(perceptual_backbone="none", disc_start=5, disc_channels=8), False)
    x = torch.rand(2, 3, 32, 32, generator=seeded) * 2 - 1
    rec, ql, _ = m(x)
    _, logs_before = loss.generator_loss(x, rec, ql, 4, m.last_layer())
    _, logs_after = loss.generator_loss(x, rec, ql, 5, m.last_layer())
    assert "g" not in logs_before and "g" in logs_after and logs_after["adaptive"] > 0


def test_factor_16_preset_shapes():
    m = build("vq-f16", resolution=64, base_channels=4, z_channels=8, attn_heads=1, codebook_size=32,
              codebook_dim=4).eval()
    assert m.factor == 16
    tokens = m.encode(torch.zeros(1, 3, 64, 96))
    assert tokens.shape == (1, 4, 6) and m.decode_tokens(tokens).shape == (1, 3, 64, 96)


def test_group_norm_keeps_channel_contrast():
    from tessera.nn import group_norm

    for ch, groups in ((32, 8), (64, 16), (128, 32), (256, 32), (8, 2), (3, 1)):
        assert group_norm(ch).num_groups == groups
    # a uniform colour survives normalization as differences between channels of a group
    x = torch.tensor([0.1, 0.7, 0.7, 0.2]).view(1, 4, 1, 1).expand(1, 4, 8, 8)
    assert group_norm(4)(x).std(dim=1).mean() > 0.5
