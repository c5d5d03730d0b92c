"""LoRA: a LoRA built with peft on a small U-Net and saved by diffusers changes Tessera's U-Net output exactly
as diffusers' own loader changes diffusers' U-Net; the kohya naming of the same weights does the same; a key
that lands nowhere is an error naming it, and nothing is merged."""
import diffusers
import pytest
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from test_stable_diffusion import _perturb

from tessera.errors import WrongModelError
from tessera.generators.sd_unet import SDUNet, SDUNetConfig
from tessera.pipelines.lora import merge_lora, parse_spec

CONFIG = dict(block_out_channels=(32, 64), layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16, attention_head_dim=4,
              norm_num_groups=8)


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("lora")
    base = _perturb(diffusers.UNet2DConditionModel(**CONFIG))
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                        target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"])
    base.add_adapter(config)
    diffusers.StableDiffusionPipeline.save_lora_weights(
        root, unet_lora_layers=get_peft_model_state_dict(base), unet_lora_adapter_metadata=config.to_dict())
    return root / "pytorch_lora_weights.safetensors", base_sd


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, 4, 8, 8, generator=g), torch.tensor([400]), torch.randn(1, 5, 16, generator=g)


def _ours(base_sd):
    ours = SDUNet(SDUNetConfig.from_diffusers(CONFIG)).eval()
    ours.load_state_dict(base_sd, strict=True)
    return ours


def test_a_peft_lora_changes_the_output_as_diffusers_loader_does(lora):
    path, base_sd = lora
    ref = diffusers.UNet2DConditionModel(**CONFIG).eval()
    ref.load_state_dict(base_sd, strict=True)
    x, t, ctx = _inputs()
    with torch.no_grad():
        before = ref(x, t, encoder_hidden_states=ctx).sample
        ref.load_lora_adapter(str(path.parent), prefix="unet", weight_name=path.name)
        want = ref(x, t, encoder_hidden_states=ctx).sample
    ours = _ours(base_sd)
    n = merge_lora({"unet": ours}, path)
    with torch.no_grad():
        got = ours(x, t, ctx)
    assert n == len({k.rsplit(".lora_", 1)[0] for k in load_file(path)})
    assert (want - before).abs().max() > 1e-2  # the LoRA does something
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    merge_lora({"unet": ours}, path, scale=-1.0)  # unmerge
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, ctx), before, atol=1e-4, rtol=1e-4)


def test_kohya_names_and_alpha_do_the_same(lora, tmp_path):
    path, base_sd = lora
    kohya = {}
    for k, v in load_file(path).items():
        module, which = k.removeprefix("unet.").rsplit(".lora_", 1)
        name = "lora_unet_" + module.replace(".", "_")
        kohya[f"{name}.{'lora_down' if which.startswith('A') else 'lora_up'}.weight"] = v
        kohya[f"{name}.alpha"] = torch.tensor(8.0)
    save_file(kohya, tmp_path / "kohya.safetensors")
    a, b = _ours(base_sd), _ours(base_sd)
    merge_lora({"unet": a}, path)
    file, scale = parse_spec(f"{tmp_path / 'kohya.safetensors'}:0.5")
    merge_lora({"unet": b}, file, scale)
    merge_lora({"unet": b}, file, scale)  # two halves: the full LoRA
    x, t, ctx = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(a(x, t, ctx), b(x, t, ctx), atol=1e-5, rtol=1e-5)


def test_a_key_that_lands_nowhere_is_named_and_nothing_is_merged(lora, tmp_path):
    path, base_sd = lora
    state = load_file(path)
    state["unet.down_blocks.7.attentions.0.proj_in.lora_A.weight"] = torch.zeros(4, 32)
    state["unet.down_blocks.7.attentions.0.proj_in.lora_B.weight"] = torch.zeros(32, 4)
    save_file(state, tmp_path / "bad.safetensors")
    ours = _ours(base_sd)
    with pytest.raises(WrongModelError, match="down_blocks.7"):
        merge_lora({"unet": ours}, tmp_path / "bad.safetensors")
    assert all(torch.equal(ours.state_dict()[k], base_sd[k]) for k in base_sd)


def test_a_pipeline_merges_a_lora_into_its_unet(lora, tmp_path):
    import json

    from test_stable_diffusion import byte_level_vocab
    from transformers import CLIPTextConfig, CLIPTextModel

    import tessera

    path, base_sd = lora
    tok = byte_level_vocab()
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=77)).eval()
    unet = diffusers.UNet2DConditionModel(**CONFIG, sample_size=8).eval()
    unet.load_state_dict(base_sd)
    vae = diffusers.AutoencoderTiny(encoder_block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4)
    diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
                                      scheduler=diffusers.EulerDiscreteScheduler(), safety_checker=None,
                                      feature_extractor=None, requires_safety_checker=False).save_pretrained(tmp_path / "p")
    assert json.loads((tmp_path / "p" / "vae" / "config.json").read_text())["_class_name"] == "AutoencoderTiny"
    pipe = tessera.load(str(tmp_path / "p"), dtype="float32")
    before = pipe.generate(["a cat"], pipe.params(steps=2, seed=1))
    assert pipe.load_lora(path) > 0
    assert (pipe.generate(["a cat"], pipe.params(steps=2, seed=1)) - before).abs().max() > 1e-3
    # `tessera generate --model DIR --lora FILE[:SCALE]`: merged on load, recorded in the PNG; a LoRA that does
    # not fit is one line and nothing is written
    from click.testing import CliRunner

    from tessera.cli import main
    from tessera.pipelines.records import read_record

    args = ["generate", "a cat", "--model", str(tmp_path / "p"), "--size", "64", "--steps", "2", "--seed", "1"]
    r = CliRunner().invoke(main, [*args, "--lora", f"{path}:0.7", "-o", str(tmp_path / "x.png")])
    assert r.exit_code == 0, r.output
    assert read_record(tmp_path / "x.png")["loras"] == [f"{path}:0.7"]
    state = load_file(path)
    state["unet.nowhere.lora_A.weight"], state["unet.nowhere.lora_B.weight"] = torch.zeros(4, 8), torch.zeros(8, 4)
    save_file(state, tmp_path / "bad.safetensors")
    r = CliRunner().invoke(main, [*args, "--lora", str(tmp_path / "bad.safetensors"), "-o", str(tmp_path / "y.png")])
    assert r.exit_code != 0 and "unet:nowhere" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "y.png").exists()
    # `tessera serve --model DIR --lora FILE[:SCALE]`: the served images carry it too
    import base64

    from fastapi.testclient import TestClient

    from tessera.serve.app import build_server

    app, _ = build_server(models=[str(tmp_path / "p")], loras=(f"{path}:0.7",), data_dir=str(tmp_path / "serve"),
                          dtype="float32")
    with TestClient(app) as c:
        r = c.post("/v1/images/generations", json={"prompt": "a cat", "size": "128x128", "steps": 2, "seed": 1,
                                                    "response_format": "b64_json"})
        assert r.status_code == 200, r.text
    (tmp_path / "served.png").write_bytes(base64.b64decode(r.json()["data"][0]["b64_json"]))
    assert read_record(tmp_path / "served.png")["loras"] == [f"{path}:0.7"]
    with pytest.raises(Exception, match="--lora"):
        build_server("superres", loras=(str(path),))
