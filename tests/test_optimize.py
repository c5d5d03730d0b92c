"""The model optimization pipeline (issue 24): static int8 layers and `tessera optimize --int8` on a Stable
Diffusion folder, few-step distillation targets and `tessera optimize --distill-steps` on a tiny U-Net."""
import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import tessera
from tessera.cli import main
from tessera.nn import quant

pytestmark = pytest.mark.skipif(not quant.static_available(), reason="needs torch's oneDNN int8 ops")


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(16, 64, 3, padding=1)
        self.proj = nn.Linear(64, 24)
        self.time = nn.Linear(64, 24)

    def forward(self, x):
        h = torch.nn.functional.silu(self.conv(x)).flatten(2).transpose(1, 2)  # (B, HW, 64)
        return self.proj(h) + self.time(h.mean(1, keepdim=True))


def _fake_quant(x, lo, hi, qmax):
    scale, zp = quant._qparams(lo, hi, qmax)
    return (torch.clamp(torch.round(x / scale) + zp, 0, qmax) - zp) * scale


def test_static_int8_layers_equal_their_fake_quantized_float_layers(seeded):
    net = Net().eval()
    xs = [torch.randn(2, 16, 8, 8, generator=seeded) for _ in range(3)]
    stats = quant.observe_inputs(net, lambda: [net(x) for x in xs])
    assert stats["conv"]["rows"] == 128 and stats["time"]["rows"] == 2
    conv, proj = net.conv, net.proj
    report = quant.quantize_static(net, stats)
    assert report["quantized"] == ["conv", "proj"] and "memory-bound" in report["kept"]["time"]
    assert isinstance(net.conv, quant.StaticInt8Conv2d) and type(net.time) is nn.Linear
    qmax = quant.cpu_quant_max()
    x = xs[0]
    with torch.no_grad():
        got = net.conv(x)
        w = net.conv.weight_int8.float() * net.conv.weight_scale[:, None, None, None]
        want = nn.functional.conv2d(_fake_quant(x, stats["conv"]["lo"], stats["conv"]["hi"], qmax), w, conv.bias, padding=1)
        torch.testing.assert_close(got, want, atol=1e-4 * want.abs().max().item(), rtol=0)
        assert ((got - conv(x)).norm() / conv(x).norm()) < 0.05  # and near the float layer
        h = torch.randn(2, 5, 64, generator=seeded).clamp(stats["proj"]["lo"], stats["proj"]["hi"])
        w = net.proj.weight_int8.float() * net.proj.weight_scale[:, None]
        want = _fake_quant(h, stats["proj"]["lo"], stats["proj"]["hi"], qmax) @ w.T + proj.bias
        torch.testing.assert_close(net.proj(h), want, atol=1e-4 * want.abs().max().item(), rtol=0)
    state = net.state_dict()
    assert state["conv.weight_int8"].dtype == torch.int8 and "conv.weight" not in state
    fresh = Net()
    quant.quantize_static(fresh, {}, layers=report["quantized"])  # the stored structure, then a strict load
    fresh.load_state_dict(state, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), net(x))


def test_a_static_int8_conv_after_a_nearest_upsample_reads_upsampled_codes_in_the_pipeline_dtype(seeded):
    conv = nn.Conv2d(16, 8, 3, padding=1).eval()
    x = torch.randn(1, 16, 4, 4, generator=seeded)
    q = quant.StaticInt8Conv2d(conv).set_from(conv, float(x.min()), float(x.max()))
    assert quant.upsample_nearest(x, conv, scale_factor=2.0).dtype == torch.float32  # a float conv: a plain upsample
    for dtype in (torch.float32, torch.bfloat16):  # bf16: the pipeline's dtype, its scales float32 (as calibrated)
        q._packed = None
        with torch.no_grad():
            codes = quant.upsample_nearest(x.to(dtype), q, scale_factor=2.0)
            assert codes.dtype == torch.uint8 and codes.shape == (1, 16, 8, 8)
            got = q(codes)
            assert got.dtype == dtype and q._packed[0][0] == dtype  # packed once, for the float dtype
            want = q(torch.nn.functional.interpolate(x.to(dtype), scale_factor=2.0, mode="nearest"))
            torch.testing.assert_close(got, want)  # the same codes as quantizing after the upsample
            ref = conv(torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))
            assert float((got.float() - ref).norm() / ref.norm()) < 0.05


def test_a_layer_whose_int8_output_is_far_from_the_float_one_stays_float(seeded):
    xs = [torch.randn(2, 16, 8, 8, generator=seeded) for _ in range(2)]
    for outlier, far in ((None, set()), (3e3, {"conv", "proj"})):  # one huge input value (and its conv output)
        net = Net().eval()
        if outlier:
            xs[1][0, 0, 0, 0] = outlier
        stats = quant.observe_inputs(net, lambda: [net(x) for x in xs])
        errors = quant.measure_errors(net, stats, lambda: [net(x) for x in xs])
        assert set(errors) == {"conv", "proj"} and all(e > 0 for e in errors.values())  # "time": 2 rows, not a candidate
        assert {n for n, e in errors.items() if e > quant.MAX_ERROR} == far, errors
        report = quant.quantize_static(net, stats)
        assert set(report["quantized"]) == {"conv", "proj"} - far
        assert all("from the float layer's on the calibration prompt" in report["kept"][n] for n in far)


def test_measured_selection_keeps_a_layer_whose_int8_form_is_not_faster(seeded):
    net = Net().eval()
    xs = [torch.randn(1, 16, 8, 8, generator=seeded)]
    stats = quant.observe_inputs(net, lambda: [net(x) for x in xs])
    assert stats["conv"]["shape"] == [1, 16, 8, 8] and stats["proj"]["shape"] == [1, 64, 64]
    conv = net.conv
    timing = quant.time_in_network(net, stats, lambda: [net(x) for x in xs], rounds=3)
    assert set(timing) == {"conv", "proj"} and all(f > 0 and q > 0 for f, q in timing.values())  # not "time": 1 row
    assert net.conv is conv and "weight" in dict(net.conv.named_parameters())  # the float layers back, unpacked
    report = quant.quantize_static(Net().eval(), stats, timing={"conv": (1e-3, 0.5e-3), "proj": (1e-3, 0.99e-3)})
    assert report["quantized"] == ["conv"]
    assert "int8 0.99 ms (with its quantize) vs float 1.00 ms, not 1.05x faster" in report["kept"]["proj"]
    assert report["kept"]["proj"].startswith("measured in the network at (1, 64, 64)")


def _tiny_taesd(channels: int = 16):
    from tessera.tokenizer.taesd import TinyAutoencoder, TinyAutoencoderConfig

    torch.manual_seed(0)
    return TinyAutoencoder(TinyAutoencoderConfig(encoder_channels=(channels,) * 4, decoder_channels=(channels,) * 4)).eval()


def test_taesd_int8_decoder_chains_u8_and_stays_close_to_the_float_one(seeded):
    from tessera.tokenizer.taesd import Int8Block

    vae = _tiny_taesd()
    z = [torch.randn(1, 4, 4, 4, generator=seeded) * 2 for _ in range(3)]
    with torch.no_grad():
        stats = quant.observe_inputs(vae, lambda: [vae.decode_latents(x) for x in z])
        want = vae.decode_latents(z[0])
        report = vae.quantize_int8(stats)
        got = vae.decode_latents(z[0])
    layers = vae.decoder.layers
    assert "decoder.layers.0" in report["kept"] and type(layers[0]) is nn.Conv2d  # 4 input channels: float
    assert len(report["quantized"]) == 3 * (3 + 3 + 3 + 1) + 3 + 1  # every Block's convs, the upsample convs, the last
    blocks = [m for m in layers if isinstance(m, Int8Block)]
    assert len(blocks) == 10 and all(b.conv[4].accum_range is not None and b.conv[4].unary == "relu" for b in blocks)
    assert layers[-1].output_range is None and blocks[-1].conv[4].output_range is not None  # float out at the end only
    assert got.dtype == torch.float32 and got.shape == want.shape == (1, 3, 32, 32)
    err = float((got - want).norm() / want.norm())
    assert 0 < err < 0.05, err
    fresh = _tiny_taesd()  # the structure from the plan alone, then a strict load
    assert fresh.quantize_int8(None)["quantized"] == report["quantized"]
    fresh.load_state_dict(vae.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh.decode_latents(z[1]), vae.decode_latents(z[1]))


def _sd_folder(root, taesd: bool = False):
    import diffusers
    from test_stable_diffusion import tiny_components

    torch.manual_seed(0)
    tokenizer, text, unet, vae = tiny_components(in_channels=4)
    if taesd:
        vae = diffusers.AutoencoderTiny(encoder_block_out_channels=(16,) * 4, decoder_block_out_channels=(16,) * 4)
    sched = diffusers.EulerAncestralDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                      timestep_spacing="trailing")
    diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=sched,
                                      safety_checker=None, feature_extractor=None,
                                      requires_safety_checker=False).save_pretrained(root)


@pytest.fixture(scope="module")
def int8_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd-int8")
    _sd_folder(root / "pipe")
    (root / "prompts.txt").write_text("a bowl of soup\na red bicycle\n")
    r = run("optimize", root / "pipe", "--int8", "-o", root / "int8", "--steps", "2", "--calibration", root / "prompts.txt",
            "--int8-layers", "all")
    assert r.exit_code == 0, r.output
    return root


def test_optimize_int8_of_a_taesd_folder_quantizes_its_decoder_and_times_the_unet_layers(tmp_path):
    from tessera.tokenizer.taesd import Int8Block

    _sd_folder(tmp_path / "pipe", taesd=True)
    r = run("optimize", tmp_path / "pipe", "--int8", "-o", tmp_path / "int8", "--steps", "1", "--size", "64", "--cfg", "0")
    assert r.exit_code == 0, r.output
    unet = json.loads((tmp_path / "int8" / "unet" / "quantization.json").read_text())
    vae = json.loads((tmp_path / "int8" / "vae" / "quantization.json").read_text())
    assert unet["calibration"]["guidance"] == 0 and unet["calibration"]["size"] == 64
    assert unet["kept"]["time_embedding.linear_2"].startswith("1 rows per call")  # SD-Turbo's serving: no CFG batch
    assert set(unet["timing_ms"]) == {k for k in unet["quantized"]} | {k for k, v in unet["kept"].items()
                                                                       if v.startswith("measured")}
    assert unet["cpu"] and vae["plan"] == quant.CHAINED and len(vae["quantized"]) == 34
    index = json.loads((tmp_path / "int8" / "model_index.json").read_text())
    assert set(index["_tessera_optimized"]) == {"unet", "vae"}
    f, q = tessera.load(str(tmp_path / "pipe"), dtype="float32"), tessera.load(str(tmp_path / "int8"), dtype="float32")
    assert sum(isinstance(m, Int8Block) for m in q.tokenizer.modules()) == 10
    assert "int8 static, 34 layers" in q.models["tokenizer"]["quantization"]
    kw = dict(num_inference_steps=1, height=64, width=64, output_type="pt")
    a = f("a bowl of soup", generator=torch.Generator().manual_seed(0), **kw).images
    b = q("a bowl of soup", generator=torch.Generator().manual_seed(0), **kw).images
    assert a.shape == b.shape == (1, 3, 64, 64) and 0 < float((a - b).abs().mean()) < 0.05


def test_optimize_int8_writes_a_folder_tessera_loads_with_int8_layers(int8_folder):
    out = int8_folder / "int8"
    record = json.loads((out / "unet" / "quantization.json").read_text())
    assert record["calibration"]["prompts"] == ["a bowl of soup", "a red bicycle"]
    assert "conv_in" in record["kept"] and "time_embedding.linear_1" in record["kept"]  # 4 channels; 1 row
    assert any(k.endswith("attn1.to_q") for k in record["quantized"]) and "conv_out" in record["quantized"]
    assert "_tessera_optimized" in json.loads((out / "model_index.json").read_text())
    assert (out / "OPTIMIZED.md").is_file() and (out / "text_encoder").is_dir()
    f, q = tessera.load(str(int8_folder / "pipe"), dtype="float32"), tessera.load(str(out), dtype="float32")
    layers = [m for m in q.generator.modules() if isinstance(m, (quant.StaticInt8Conv2d, quant.StaticInt8Linear))]
    assert len(layers) == len(record["quantized"])
    assert "int8 static" in q.models["generator"]["quantization"] and "quantization" not in f.models["generator"]
    torch.manual_seed(3)
    x, t = torch.randn(1, 4, 8, 8) * 14.6, torch.tensor([999])  # the 1-step call's input (sigma_max x_T)
    with torch.no_grad():
        states = f._states(["a bowl of soup"])
        want, got = f.generator(x, t, states), q.generator(x, t, states)
    err = float((got - want).norm() / want.norm())
    assert 0 < err < 0.1, err  # changed (int8), but close
    image = q("a bowl of soup", num_inference_steps=1, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (16, 16)


def test_optimize_int8_quantizes_an_sd_vae_decoder_layer_by_layer_and_leaves_its_encoder_float(int8_folder):
    out = int8_folder / "int8"
    record = json.loads((out / "vae" / "quantization.json").read_text())
    assert "plan" not in record and record["quantized"] and all(k.startswith("decoder.") for k in record["quantized"])
    assert record["kept"]["encoder.conv_in"] == "not reached during calibration"  # text-to-image never encodes
    assert "decoder.conv_in" in record["kept"] and "post_quant_conv" in record["kept"]  # 4 input channels
    assert set(json.loads((out / "model_index.json").read_text())["_tessera_optimized"]) == {"unet", "vae"}
    f, q = tessera.load(str(int8_folder / "pipe"), dtype="float32"), tessera.load(str(out), dtype="float32")
    layers = [n for n, m in q.tokenizer.named_modules() if isinstance(m, (quant.StaticInt8Conv2d, quant.StaticInt8Linear))]
    assert layers == record["quantized"] and "int8 static" in q.models["tokenizer"]["quantization"]
    torch.manual_seed(4)
    images = torch.rand(1, 3, 16, 16) * 2 - 1
    x0 = f("a red bicycle", num_inference_steps=2, generator=torch.Generator().manual_seed(5), output_type="latent").images
    with torch.no_grad():
        want, got = f.decode(x0), q.decode(x0)  # the float U-Net's latents, as calibrated (2 steps)
        err = float((got - want).norm() / want.norm())
        assert 0 < err < 0.1, err  # changed (int8), but close
        assert torch.equal(q.tokenizer.encode_latents(images), f.tokenizer.encode_latents(images))  # img2img intact


def test_optimize_int8_refuses_what_it_cannot_do_and_a_tampered_folder_fails_loudly(int8_folder, tmp_path):
    from safetensors.torch import load_file, save_file

    out = int8_folder / "int8"
    r = run("optimize", out, "--int8", "-o", tmp_path / "again")
    assert r.exit_code != 0 and "already int8" in r.output
    r = run("optimize", int8_folder / "pipe", "--int8", "-o", out)
    assert r.exit_code != 0 and "not empty" in r.output
    r = run("optimize", int8_folder / "pipe", "-o", tmp_path / "x")
    assert r.exit_code != 0 and "give one of --int8, --distill-steps N or --prune F" in r.output
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    state.pop("conv_out.input_range")
    save_file(state, str(weights))
    with pytest.raises(tessera.errors.WrongModelError, match="conv_out.input_range"):
        tessera.load(str(broken), dtype="float32")


def test_optimize_int8_of_a_tessera_generator_writes_weight_only_int8_that_loads_and_is_recorded(tmp_path):
    from tessera.records import read_record

    r = run("optimize", "ar-xs", "--int8", "--int8-layers", "all", "-o", tmp_path / "ar8")
    assert r.exit_code == 0, r.output
    report = json.loads(r.output[r.output.index("{"):])
    meta = json.loads((tmp_path / "ar8" / "meta.json").read_text())
    assert meta["quantization"]["scheme"].startswith("int8 weight-only") and len(meta["quantization"]["layers"]) == 26
    assert report["speed_ratio"] == meta["quantization"]["speed_ratio"] > 0 and meta["task"]["tokens"]
    model = tessera.load(str(tmp_path / "ar8"))  # a model folder: the network
    assert sum(isinstance(m, quant.Int8Linear) for m in model.modules()) == 26
    assert not any(type(m) is nn.Linear for m in model.modules())
    r = run("generate", "a red bicycle", "--model", tmp_path / "ar8", "--size", "0", "--seed", "1", "-o", tmp_path / "a.png")
    assert r.exit_code == 0, r.output
    assert read_record(tmp_path / "a.png")["optimized"]["quantization"] == "int8 weight-only, 26 layers"
    r = run("optimize", tmp_path / "ar8", "--int8", "--int8-layers", "all", "-o", tmp_path / "again")
    assert r.exit_code != 0 and "already int8 weight-only" in r.output
    meta["quantization"]["layers"][0] = "no.such.layer"  # a tampered record fails loudly
    (tmp_path / "ar8" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(tessera.errors.WrongModelError, match="names 26 linear layers; the network has 25 of them"):
        tessera.load(str(tmp_path / "ar8"))


def test_optimize_int8_of_a_tessera_generator_writes_nothing_where_int8_is_slower(tmp_path, monkeypatch):
    from tessera.train import int8 as weight_only

    monkeypatch.setattr(weight_only, "_generation_seconds", lambda pipes, calls: {"float": 0.2, "int8": 0.4})
    with pytest.raises(tessera.errors.InvalidInputError, match=r"0.50x its float generation stage .* nothing written"):
        weight_only.quantize_model("ar-xs", tmp_path / "slow")
    assert not (tmp_path / "slow").exists()


# ---- few-step distillation --------------------------------------------------------------------------------
def test_distillation_target_is_where_one_ddim_step_lands_on_the_teacher_jump(seeded):
    from tessera.sampling.diffusion import DiffusionConfig, Schedule
    from tessera.sampling.distill import segments, teacher_jump, x0_target

    schedule = Schedule(DiffusionConfig(timestep_spacing="trailing"))
    table = segments(schedule, 4, 20)
    assert table.shape == (4, 6) and table[0, 0] == 999 and table[-1, -1] == -1 and table[1, 0] == table[0, -1]
    with pytest.raises(ValueError, match="multiple"):
        segments(schedule, 3, 20)
    teacher = lambda x, t: torch.tanh(x) * 0.5 + 0.1  # noqa: E731  any deterministic eps-predictor
    x_t = torch.randn(3, 2, 4, 4, generator=seeded)
    for k in range(4):
        path = table[k].expand(3, -1)
        x_next = teacher_jump(teacher, schedule, x_t, path)
        x0 = x0_target(schedule, x_t, path[:, 0], x_next, path[:, -1])
        a, a_next = schedule.abar(path[:, 0], x_t), schedule.abar(path[:, -1], x_t)
        eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
        torch.testing.assert_close(a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps, x_next, atol=1e-4, rtol=1e-4)


def test_optimize_distill_trains_a_student_that_samples_its_own_steps(tiny_dataset, tiny_model, tmp_path):
    from conftest import tiny_preset

    r = run("train", "diffusion", "--data", tiny_dataset, "--out", tmp_path / "t", "--preset", tiny_preset("unet-tiny"),
            "--tokenizer", tiny_model, "--text-encoder", "tiny", "--max-steps", "2", "--set", "train.batch_size=4",
            "--set", "train.val_every=0")
    assert r.exit_code == 0, r.output
    assert run("export", tmp_path / "t", "-o", tmp_path / "teacher").exit_code == 0
    r = run("optimize", tmp_path / "teacher", "--distill-steps", "2", "--data", tiny_dataset, "-o", tmp_path / "s",
            "--max-steps", "3", "--set", "train.batch_size=4", "--set", "train.val_every=0", "--set", "task.teacher_steps=6")
    assert r.exit_code == 0, r.output
    task = json.loads((tmp_path / "s" / "meta.json").read_text())["task"]
    assert task["teacher"] == str(tmp_path / "teacher") and task["diffusion"]["timestep_spacing"] == "trailing"
    from tessera.pipelines.folder import load_pipeline

    pipe = load_pipeline(str(tmp_path / "s"), text_encoder="tiny", dtype="float32")
    assert pipe.sampler.steps == 2 and pipe.sampler.cfg_scale == 1.0
    assert "2-step student" in pipe.models["generator"]["distilled"]
    teacher, student = tessera.load(str(tmp_path / "teacher")), tessera.load(str(tmp_path / "s"))
    assert any(not torch.equal(a, b) for a, b in zip(teacher.state_dict().values(), student.state_dict().values()))
    r = run("optimize", tmp_path / "s", "--distill-steps", "2", "--data", tiny_dataset, "-o", tmp_path / "s2")
    assert r.exit_code != 0 and "is a 2-step student; the next round needs fewer steps" in r.output
    r = run("optimize", tmp_path / "teacher", "--distill-steps", "2", "--data", tiny_dataset, "-o", tmp_path / "g",
            "--max-steps", "2", "--set", "train.batch_size=4", "--set", "train.val_every=0",
            "--set", "task.teacher_steps=4", "--set", "task.student_cfg=3")
    assert r.exit_code == 0, r.output  # a student that keeps guidance samples guided at its own scale
    pipe = load_pipeline(str(tmp_path / "g"), text_encoder="tiny", dtype="float32")
    assert pipe.sampler.steps == 2 and pipe.sampler.cfg_scale == 3.0
    assert pipe.models["generator"]["distilled"].endswith("guidance 3")
    r = run("optimize", tmp_path / "g", "--distill-steps", "1", "--data", tiny_dataset, "-o", tmp_path / "g1",
            "--max-steps", "2", "--set", "train.batch_size=4", "--set", "train.val_every=2")
    assert r.exit_code == 0, r.output  # the next round of progressive distillation: g teaches at 2 steps, guidance 3
    val = [json.loads(line) for line in (tmp_path / "g1.run" / "log.jsonl").read_text().splitlines()]
    val = [row for row in val if "val/distill_error" in row]  # the student's objective, beside its start's
    assert val and val[-1]["val/distill_error"] > 0 and val[-1]["val/distill_error_teacher"] > 0
    task = json.loads((tmp_path / "g1" / "meta.json").read_text())["task"]
    assert (task["teacher"], task["teacher_steps"], task["teacher_cfg"]) == (str(tmp_path / "g"), 2, 3.0)
    assert load_pipeline(str(tmp_path / "g1"), text_encoder="tiny", dtype="float32").sampler.steps == 1


def test_a_guided_student_learns_through_both_of_its_branches(seeded):
    from tessera.sampling.diffusion import DiffusionConfig, Schedule, guided_denoiser
    from tessera.sampling.distill import distill_loss, segments

    schedule = Schedule(DiffusionConfig(timestep_spacing="trailing"))
    table = segments(schedule, 2, 4)
    net_c, net_u = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)  # the conditional and the null branch

    def model(x, t, cond, mask, drop):  # drop None: every sample conditional
        return net_c(x) if drop is None else torch.where(drop[:, None, None, None], net_u(x), net_c(x))

    cond, mask = torch.randn(3, 2, 4, generator=seeded), torch.ones(3, 2, dtype=torch.bool)
    teacher = lambda x, t: torch.zeros_like(x)  # noqa: E731
    x0 = torch.randn(3, 1, 4, 4, generator=seeded)
    for scale, null_learns in ((1.0, False), (3.0, True)):
        net_c.zero_grad(), net_u.zero_grad()
        student = guided_denoiser(model, cond, mask, scale)
        distill_loss(student, teacher, schedule, table, x0, torch.Generator().manual_seed(0)).mean().backward()
        assert net_c.weight.grad.abs().sum() > 0
        assert (net_u.weight.grad is not None and net_u.weight.grad.abs().sum() > 0) == null_learns
    x = torch.randn(3, 1, 4, 4, generator=seeded)  # the student's output is u + s (c - u)
    with torch.no_grad():
        torch.testing.assert_close(student(x, torch.zeros(3)), net_u(x) + 3.0 * (net_c(x) - net_u(x)))


def test_trajectory_distillation_fits_the_students_whole_run_to_the_teachers(seeded):
    from tessera.sampling.diffusion import DiffusionConfig, Schedule, sample
    from tessera.sampling.distill import trajectory_loss

    student_s, teacher_s = Schedule(DiffusionConfig(timestep_spacing="trailing")), Schedule(DiffusionConfig())
    teacher = lambda x, t: torch.tanh(x) * 0.5 + 0.1  # noqa: E731  any deterministic eps-predictor
    x_T = torch.randn(3, 1, 4, 4, generator=seeded)
    same = trajectory_loss(teacher, teacher, teacher_s, teacher_s, (8, 8), ("ddim", "ddim"), x_T)
    assert same.shape == (3,) and same.abs().max() < 1e-10  # a student that IS the teacher's run: zero error
    net = torch.nn.Linear(4, 4)
    student = lambda x, t: net(x)  # noqa: E731
    loss = trajectory_loss(student, teacher, student_s, teacher_s, (2, 8), ("dpmpp_2m", "ddim"), x_T)
    with torch.no_grad():
        want = (sample(student, student_s, x_T, 2, "dpmpp_2m") - sample(teacher, teacher_s, x_T, 8, "ddim"))
    torch.testing.assert_close(loss, want.pow(2).flatten(1).mean(1))
    loss.mean().backward()
    assert net.weight.grad.abs().sum() > 0  # gradients flow through the solver's steps
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    first = float(loss.mean())
    for _ in range(100):
        opt.zero_grad()
        trajectory_loss(student, teacher, student_s, teacher_s, (2, 8), ("dpmpp_2m", "ddim"), x_T).mean().backward()
        opt.step()
    assert float(trajectory_loss(student, teacher, student_s, teacher_s, (2, 8), ("dpmpp_2m", "ddim"), x_T).mean()) \
        < 0.5 * first  # the objective is one a student can lower


def test_optimize_distill_trajectory_objective_samples_with_the_students_solver(tiny_dataset, tiny_model, tmp_path):
    from conftest import tiny_preset
    from tessera.pipelines.folder import load_pipeline

    r = run("train", "diffusion", "--data", tiny_dataset, "--out", tmp_path / "t", "--preset", tiny_preset("unet-tiny"),
            "--tokenizer", tiny_model, "--text-encoder", "tiny", "--max-steps", "2", "--set", "train.batch_size=4",
            "--set", "train.val_every=0")
    assert r.exit_code == 0, r.output
    assert run("export", tmp_path / "t", "-o", tmp_path / "teacher").exit_code == 0
    common = ["--distill-steps", "2", "--data", tiny_dataset, "--max-steps", "2", "--set", "train.batch_size=4",
              "--set", "task.teacher_steps=6", "--set", "task.student_cfg=2", "--set", "task.objective=trajectory"]
    r = run("optimize", tmp_path / "teacher", *common, "--set", "task.student_method=euler_a", "-o", tmp_path / "bad")
    assert r.exit_code != 0 and "student_method='euler_a'" in r.output  # stochastic: no run to fit
    r = run("optimize", tmp_path / "teacher", *common, "--set", "task.student_method=dpmpp_2m",
            "--set", "train.val_every=2", "-o", tmp_path / "s")
    assert r.exit_code == 0, r.output
    pipe = load_pipeline(str(tmp_path / "s"), text_encoder="tiny", dtype="float32")
    assert (pipe.sampler.steps, pipe.sampler.cfg_scale, pipe.sampler.method) == (2, 2.0, "dpmpp_2m")
    val = [json.loads(line) for line in (tmp_path / "s.run" / "log.jsonl").read_text().splitlines()]
    val = [row for row in val if "val/distill_error" in row]
    assert val and val[-1]["val/distill_error"] > 0 and val[-1]["val/distill_error_teacher"] > 0
    image = pipe("a red square", generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert torch.isfinite(image).all()


def test_pruning_removes_the_least_important_mlp_channels_and_keeps_the_rest_exact(seeded):
    from conftest import tiny_preset
    from tessera.nn.prune import _pruned_mlps, prune_mlps
    from tessera.registry import build

    model = build(tiny_preset("masked-tiny")).eval()
    mlps = _pruned_mlps(model)
    assert len(mlps) == 2  # one per block
    with torch.no_grad():  # half the channels of each MLP reach nothing: removing them changes no output
        for i, mlp in enumerate(mlps.values()):
            dead = torch.randperm(128, generator=torch.Generator().manual_seed(i))[:64]
            mlp.fc2.weight[:, dead] = 0
    pruned, report = prune_mlps(model, 0.5)
    assert pruned.config.mlp_ratio == 2.0 and report["mlp_hidden"] == [128, 64]
    assert report["parameters"][1] == report["parameters"][0] - 2 * 64 * (2 * 32 + 1)
    tokens = torch.randint(0, 65, (2, 16), generator=torch.Generator().manual_seed(3))
    cond, mask = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(4)), torch.ones(2, 8, dtype=torch.bool)
    torch.testing.assert_close(pruned(tokens, cond, mask), model(tokens, cond, mask), atol=1e-5, rtol=1e-5)
    heavier, _ = prune_mlps(model, 0.75)  # past the dead channels: live ones go, the output changes
    assert heavier.config.mlp_ratio == 1.0
    assert not torch.allclose(heavier(tokens, cond, mask), model(tokens, cond, mask), atol=1e-3)


def test_optimize_prune_fine_tunes_a_smaller_model_that_loads_and_samples(tiny_dataset, tiny_model, tmp_path):
    from conftest import tiny_preset

    r = run("train", "masked", "--data", tiny_dataset, "--out", tmp_path / "m", "--preset", tiny_preset("masked-tiny"),
            "--tokenizer", tiny_model, "--text-encoder", "tiny", "--max-steps", "2", "--set", "train.batch_size=4",
            "--set", "train.val_every=0")
    assert r.exit_code == 0, r.output
    assert run("export", tmp_path / "m", "-o", tmp_path / "mm").exit_code == 0
    r = run("optimize", tmp_path / "mm", "--prune", "0.5", "--data", tiny_dataset, "-o", tmp_path / "p",
            "--max-steps", "2", "--set", "train.batch_size=4", "--set", "train.val_every=0")
    assert r.exit_code == 0, r.output
    report = json.loads(r.output[r.output.index('{\n  "out"'):])  # after the caches' progress bars
    assert report["mlp_hidden"] == [128, 64] and report["parameters"][1] < report["parameters"][0]
    meta = json.loads((tmp_path / "p" / "meta.json").read_text())
    assert meta["pruned"]["recovery_steps"] == 2 and meta["trained_steps"] == 2
    pruned = tessera.load(str(tmp_path / "p"))
    assert pruned.config.mlp_ratio == 2.0
    r = run("sample", "masked", "a red fox", "--model", tmp_path / "p", "--tokenizer", tiny_model, "--text-encoder",
            "tiny", "--steps", "2", "-n", "1", "-o", tmp_path / "s.png")
    assert r.exit_code == 0, r.output
    for args, message in ((["--prune", "1.5"], "must be in (0, 1)"), (["--prune", "0.5", "--int8"], "give one of"),
                          (["--prune", "0.001"], "removes no channel")):
        r = run("optimize", tmp_path / "mm", *args, "-o", tmp_path / "bad")
        assert r.exit_code != 0 and message in r.output, r.output
