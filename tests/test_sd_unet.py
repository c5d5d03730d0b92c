"""Tessera's SD U-Net against diffusers' UNet2DConditionModel built from small configs in SD1 style (1x1-conv
projections, one head count) and SD2 style (linear projections, heads per level), with 2 and 3 levels:
diffusers' weights load strictly and the outputs are equal to 1e-4 (fp32)."""
import diffusers
import pytest
import torch

import tessera
from tessera.checkpoint import export_model
from tessera.generators.sd_unet import SDUNet, SDUNetConfig

CONFIGS = {
    "sd1-2-levels": dict(block_out_channels=(32, 64), layers_per_block=1, down_block_types=("CrossAttnDownBlock2D",
                         "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=24,
                         attention_head_dim=4, norm_num_groups=8),
    "sd2-3-levels": dict(block_out_channels=(16, 32, 32), layers_per_block=2,
                         down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                         cross_attention_dim=20, attention_head_dim=(2, 4, 4), use_linear_projection=True,
                         norm_num_groups=8, transformer_layers_per_block=(1, 2, 1)),
    "all-cross-attention": dict(block_out_channels=(16, 32), layers_per_block=1, cross_attention_dim=12,
                                down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2,
                                attention_head_dim=2, norm_num_groups=8, in_channels=9, out_channels=4,
                                flip_sin_to_cos=False, freq_shift=1),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_sd_unet_equals_diffusers(name, tmp_path):
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(**CONFIGS[name]).eval()
    with torch.no_grad():  # every weight random (diffusers zero-initialises no layer here, but norms are 1/0)
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ours = SDUNet(SDUNetConfig.from_diffusers(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    c = ref.config
    x = torch.randn(2, c.in_channels, 16, 16)
    context = torch.randn(2, 7, c.cross_attention_dim)
    for t in (torch.tensor([999, 10]), torch.tensor(531.25)):
        with torch.no_grad():
            want = ref(x, t, encoder_hidden_states=context).sample
            got = ours(x, t, context)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    back = tessera.load(str(export_model(ours, tmp_path / "unet")))
    with torch.no_grad():
        torch.testing.assert_close(back(x, t, context), got)


def test_odd_sizes_upsample_to_the_skip_size():
    ref = diffusers.UNet2DConditionModel(**CONFIGS["sd1-2-levels"]).eval()
    ours = SDUNet(SDUNetConfig.from_diffusers(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x, ctx = torch.randn(1, 4, 15, 13), torch.randn(1, 3, 24)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, torch.tensor([5]), ctx), ref(x, 5, encoder_hidden_states=ctx).sample,
                                   atol=1e-4, rtol=1e-4)


def test_unet_settings_it_does_not_have_are_refused():
    for bad, needle in (({"time_embedding_type": "fourier"}, "time_embedding_type"),
                        ({"addition_embed_type": "text_time"}, "addition_embed_type"),
                        ({"down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
                          "block_out_channels": (32, 64)}, "mirrored"),
                        ({"fancy": 1}, "unknown key")):
        with pytest.raises(ValueError, match=needle):
            SDUNetConfig.from_diffusers(bad)
