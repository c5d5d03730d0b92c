"""The continuous-latent autoencoders against diffusers, built from small random configs: the SD VAE
(`AutoencoderKL`) and TAESD (`AutoencoderTiny`) load diffusers' weights strictly and encode / decode the
same to 1e-4 (fp32)."""
import diffusers
import pytest
import torch

from tessera.checkpoint import export_model
from tessera.tokenizer.kl import KLAutoencoder, KLAutoencoderConfig
from tessera.tokenizer.taesd import TinyAutoencoder, TinyAutoencoderConfig, from_taesd_state_dict


def _perturbed(model):
    torch.manual_seed(1)
    with torch.no_grad():  # random weights everywhere, norms and zero-initialised layers included
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


TINY_CONFIGS = [
    dict(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8)),  # TAESD's layout
    dict(encoder_block_out_channels=(16, 16, 16), decoder_block_out_channels=(16, 16, 16), num_encoder_blocks=(1, 2, 1),
         num_decoder_blocks=(2, 1, 1), latent_channels=16),
]


@pytest.mark.parametrize("config", TINY_CONFIGS)
def test_taesd_equals_diffusers_autoencoder_tiny(config, tmp_path):
    torch.manual_seed(0)
    ref = _perturbed(diffusers.AutoencoderTiny(**config))
    ours = TinyAutoencoder(TinyAutoencoderConfig.from_diffusers(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z = ref.encode(x).latents
        torch.testing.assert_close(ours.encode_latents(x), z, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ours.decode_latents(z), ref.decode(z).sample, atol=1e-4, rtol=1e-4)
    assert ours.factor == 2 ** (len(config["encoder_block_out_channels"]) - 1)
    import tessera

    back = tessera.load(str(export_model(ours, tmp_path / "ours")))
    with torch.no_grad():
        torch.testing.assert_close(back.decode_latents(z), ours.decode_latents(z))


def test_original_taesd_names_map_onto_ours():
    ours = TinyAutoencoder(TinyAutoencoderConfig(encoder_channels=(8,) * 4, decoder_channels=(8,) * 4))
    sd = ours.state_dict()
    enc = {k.removeprefix("encoder.layers."): v for k, v in sd.items() if k.startswith("encoder.")}
    dec = {}
    for k, v in sd.items():
        if k.startswith("decoder.layers."):
            index, rest = k.removeprefix("decoder.layers.").split(".", 1)
            dec[f"{int(index) + 1}.{rest}"] = v  # the release counts its clamp as layer 0
    mapped = from_taesd_state_dict(enc, dec)
    assert mapped.keys() == sd.keys()
    TinyAutoencoder(ours.config).load_state_dict(mapped, strict=True)


def test_unsupported_tiny_autoencoder_settings_are_refused():
    with pytest.raises(ValueError, match="act_fn"):
        TinyAutoencoderConfig.from_diffusers({"act_fn": "silu"})
    with pytest.raises(ValueError, match="unknown key"):
        TinyAutoencoderConfig.from_diffusers({"fancy": True})


KL_CONFIGS = [
    dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2),  # 2 levels
    dict(block_out_channels=(16, 32, 32), layers_per_block=2, norm_num_groups=8, latent_channels=8,
         down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
         mid_block_add_attention=False, scaling_factor=0.13025),
]


@pytest.mark.parametrize("config", KL_CONFIGS)
def test_kl_autoencoder_equals_diffusers(config, tmp_path):
    torch.manual_seed(0)
    ref = _perturbed(diffusers.AutoencoderKL(**config))
    ours = KLAutoencoder(KLAutoencoderConfig.from_diffusers(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        dist = ref.encode(x).latent_dist
        torch.testing.assert_close(ours.encode_latents(x), dist.mode(), atol=1e-4, rtol=1e-4)
        mean, logvar = ours.moments(x)
        torch.testing.assert_close(logvar, dist.logvar, atol=1e-4, rtol=1e-4)
        z = dist.mode()
        torch.testing.assert_close(ours.decode_latents(z), ref.decode(z).sample, atol=1e-4, rtol=1e-4)
    assert ours.config.scaling_factor == config.get("scaling_factor", 0.18215)
    import tessera

    back = tessera.load(str(export_model(ours, tmp_path / "ours")))
    with torch.no_grad():
        torch.testing.assert_close(back.decode_latents(z), ours.decode_latents(z))


def test_kl_settings_it_does_not_have_are_refused():
    with pytest.raises(ValueError, match="act_fn"):
        KLAutoencoderConfig.from_diffusers({"act_fn": "gelu"})
    with pytest.raises(ValueError, match="latents_mean"):
        KLAutoencoderConfig.from_diffusers({"latents_mean": [0.1] * 4})
    with pytest.raises(ValueError, match="unknown key"):
        KLAutoencoderConfig.from_diffusers({"temporal": True})


@pytest.mark.parametrize("mid_attention", [False, True])
def test_diffusers_vqmodel_gives_the_same_tokens_and_images(mid_attention, tmp_path):
    """aMUSEd's tokenizer: diffusers' VQModel (saved by diffusers) read into Tessera's VQModel strictly; the
    tokens of `encode` and the images of `decode_tokens` equal diffusers' quantize / decode(force_not_quantize,
    lookup_from_codebook) path."""
    from tessera.pipelines.stable_diffusion import load_vae

    torch.manual_seed(0)
    ref = diffusers.VQModel(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=8,
                            num_vq_embeddings=32, vq_embed_dim=6, norm_num_groups=8, lookup_from_codebook=True,
                            mid_block_add_attention=mid_attention).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ref.save_pretrained(tmp_path / "vqvae")
    ours = load_vae(tmp_path / "vqvae", dtype=torch.float32)
    assert ours.kind == "vqmodel" and ours.factor == 2
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        _, _, (_, _, idx) = ref.quantize(ref.encode(x).latents)
        want_tokens = idx.reshape(2, 8, 8)
        tokens = ours.encode(x)
        assert torch.equal(tokens, want_tokens) and len(tokens.unique()) > 1
        want = ref.decode(tokens.reshape(-1), force_not_quantize=True, shape=(2, 8, 8, 6)).sample
        torch.testing.assert_close(ours.decode_tokens(tokens), want, atol=1e-4, rtol=1e-4)
