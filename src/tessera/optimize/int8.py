"""Static int8 for a Stable Diffusion pipeline folder (nn/quant.py's scheme: u8 activations per tensor, s8
weights per channel, oneDNN's int8 kernels, float elsewhere).

    tessera optimize DIR --int8 [--int8-layers speed|all] -o OUT

Calibration runs the float pipeline on held-out prompts (not the evaluation prompts) at the size and step
count it will serve, watching every Conv2d / Linear input of the U-Net and of the autoencoder. U-Net layers
`quant.keep_reason` keeps stay float, with the reason in the report (among them those whose int8 output is
more than 10% from the float one on a calibration prompt: `quant.measure_errors`); with `--int8-layers speed`
(the default) so does every layer whose int8 form, quantize included, is not measured 5% faster than the
prepacked float layer at its calibration shape on this CPU (AMX bf16 beats oneDNN's int8 at many of the U-Net's shapes, and
its linear layers at 4096 tokens lose to the quantize pass). A TAESD autoencoder gets its decoder's own int8
plan (tokenizer/taesd.py `quantize_int8`: u8 from conv to conv, ReLUs and residual sums fused), which is
where int8 pays most: its 64-channel maps at 256² and 512² are memory-bound in bf16. The SD VAE's decoder
(AutoencoderKL: ~1.2 TFLOPs at 512², more than a U-Net step) has a GroupNorm before nearly every convolution,
so no u8 chain: its layers are chosen and quantized one by one like the U-Net's, timed on latent decodes.

OUT is the same diffusers folder layout with `unet/` (and `vae/`) holding the int8 state and a
`quantization.json` (which layers, why the others stayed float, the calibration, the CPU they were timed on);
the other components are copied unchanged (hard links where the file system allows). Tessera loads it
(`tessera.load(OUT)`); diffusers cannot (its networks have no int8 layers), which model_index.json's
`_tessera_optimized` says.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch

from tessera.errors import InvalidInputError

# held-out calibration prompts: everyday scenes, none of them among the evaluation prompt sets
CALIBRATION_PROMPTS = ("a red bicycle leaning against a brick wall", "a bowl of ramen on a wooden table",
                       "a lighthouse on a cliff at dusk", "portrait of an old fisherman, studio light",
                       "a city street in the rain at night", "a cat sleeping on a windowsill",
                       "snowy mountains above a pine forest", "an astronaut riding a horse, oil painting")


def _copy_tree(src: Path, out: Path, skip: set[Path]) -> None:
    for path in sorted(src.rglob("*")):
        dest = out / path.relative_to(src)
        if path.is_dir():
            dest.mkdir(parents=True, exist_ok=True)
        elif path not in skip:
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(path, dest)
            except OSError:
                shutil.copy2(path, dest)


def calibrate(pipe, prompts: list[str], serve: dict) -> dict[str, dict[str, dict]]:
    """The layer input ranges of the U-Net and of the autoencoder (its decoder) over a pipeline call per
    prompt at the `serve` settings (`_serving`) -> {"unet": stats, "vae": stats} (nn/quant.observe_inputs)."""
    from tessera.nn import quant

    stats: dict[str, dict[str, dict]] = {}
    run = _calls(pipe, prompts, serve)

    def run_watching_vae():
        stats["vae"] = quant.observe_inputs(pipe.tokenizer, run)

    with pipe.unpacked():  # the plain layers (prepacked ones bypass the hooks' modules' forward)
        pipe.prepack = False
        stats["unet"] = quant.observe_inputs(pipe.generator, run_watching_vae)
    return stats


def _serving(size: int | None, steps: int | None, cfg: float | None) -> dict:
    """The pipeline-call keywords of the serving settings (None: the pipeline's own default)."""
    kw = {"num_inference_steps": steps, "guidance_scale": cfg, "height": size, "width": size}
    return {k: v for k, v in kw.items() if v is not None}


def _calls(pipe, prompts: list[str], serve: dict, output_type: str = "pt"):
    """-> a function that runs the pipeline once per prompt at the serving settings (with output_type
    "latent": the text encoder and U-Net alone)."""
    def run():
        for i, prompt in enumerate(prompts):
            pipe(prompt, generator=torch.Generator().manual_seed(i), output_type=output_type, **serve)
    return run


SELECT = ("speed", "all")  # int8 where it is measured faster here / every layer the static rules admit


def _latent_decodes(pipe, prompt: str, serve: dict):
    """-> a function that decodes the latents of one pipeline call on `prompt` (the autoencoder alone, at the
    serving size)."""
    x0 = pipe(prompt, generator=torch.Generator().manual_seed(0), output_type="latent", **serve).images
    return lambda: pipe.decode(x0)


def _quantize(net, stats: dict, select: str, run) -> dict:
    """A network's static int8 layers (nn/quant.quantize_static): each candidate's int8 output is compared with
    its float output over `run` (nn/quant.measure_errors: the pipeline at its serving shape); under "speed" each
    is then timed in the network, float against int8 (nn/quant.time_in_network)."""
    from tessera.nn import quant

    errors = quant.measure_errors(net, stats, run)
    timing = quant.time_in_network(net, stats, run) if select == "speed" else None
    report = quant.quantize_static(net, stats, timing=timing)
    report["error"] = {k: round(v, 4) for k, v in errors.items()}
    if timing:
        report["timing_ms"] = {k: [round(f * 1e3, 3), round(q * 1e3, 3)] for k, (f, q) in timing.items()}
    return report


def _quantize_vae(pipe, stats: dict, select: str, prompts: list[str], serve: dict) -> dict | None:
    """The autoencoder's int8 decoder: TAESD's own u8-chained plan, or (an SD VAE, AutoencoderKL) its decoder's
    convolutions and attention projections one by one, each quantizing its float input, as the U-Net's are
    (its encoder is not run by text-to-image: not reached, kept float). None when no layer is quantized."""
    from tessera.nn import quant

    vae = pipe.tokenizer
    if hasattr(vae, "quantize_int8"):
        return vae.quantize_int8(stats) | {"plan": quant.CHAINED}
    report = _quantize(vae, stats, select, _latent_decodes(pipe, prompts[0], serve))
    return report if report["quantized"] else None


def quantize_sd_folder(src: str | Path, out: str | Path, prompts: list[str] | None = None, size: int | None = None,
                       steps: int | None = None, dtype: str | None = None, select: str = "speed",
                       cfg: float | None = None) -> dict:
    """DIR (a diffusers Stable Diffusion folder) -> OUT with a static int8 U-Net and autoencoder decoder (TAESD's
    u8-chained plan, or an SD VAE's layers one by one); -> the report. `select`: "speed" keeps in float every
    U-Net / SD VAE layer whose int8 form is not measured faster in the network on this CPU
    (nn/quant.time_in_network), "all" quantizes every one the static rules admit."""
    from tessera.nn import onednn, quant
    from tessera.pipelines.stable_diffusion import is_diffusers_folder, load_diffusers_folder

    src, out = Path(src), Path(out)
    if not is_diffusers_folder(src):
        raise InvalidInputError(f"{src}: --int8 takes a diffusers Stable Diffusion folder (model_index.json)")
    if (src / "unet" / quant.QUANT_FILE).is_file():
        raise InvalidInputError(f"{src}: its U-Net is already int8")
    if out.exists() and any(out.iterdir()):
        raise InvalidInputError(f"-o {out}: not empty (an optimized folder is never written over another)")
    if select not in SELECT:
        raise InvalidInputError(f"--int8-layers {select!r}: one of {', '.join(SELECT)}")
    if not quant.static_available():
        raise InvalidInputError("this torch build has no oneDNN int8 kernels (torch.ops.onednn.qconv_pointwise)")
    from tessera.device import placement

    t0 = time.time()
    pipe = load_diffusers_folder(src, placement(None, dtype))
    prompts = list(prompts or CALIBRATION_PROMPTS)
    serve = _serving(size, steps, cfg)
    stats = calibrate(pipe, prompts, serve)
    for net in (pipe.generator, pipe.tokenizer):
        onednn.unpack(net)
    reports = {"unet": _quantize(pipe.generator, stats["unet"], select, _calls(pipe, prompts[:1], serve, "latent"))}
    vae = _quantize_vae(pipe, stats["vae"], select, prompts, serve)
    if vae is not None:
        reports["vae"] = vae
    tmp = out.with_name(out.name + ".incoming")
    shutil.rmtree(tmp, ignore_errors=True)
    stored = {comp: _weights_file(src / comp) for comp in reports}
    _copy_tree(src, tmp, skip=set(stored.values()))
    calibration = {"prompts": prompts, "size": size, "steps": steps, "guidance": cfg}
    scheme = ("static int8: u8 activations per tensor (calibrated range), s8 weights per output channel, oneDNN "
              "kernels; float elsewhere")
    records = {}
    for comp, report in reports.items():
        net = pipe.generator if comp == "unet" else pipe.tokenizer
        _save_state(net, stored[comp], tmp / comp / stored[comp].name)
        chained = "; u8 from conv to conv, ReLU and residual sums fused" if report.get("plan") == quant.CHAINED else ""
        records[comp] = {"scheme": scheme + chained,
                         **report, "calibration": calibration | {"ranges": {k: [v["lo"], v["hi"]] for k, v in
                                                                            stats[comp].items()}},
                         "cpu": _cpu_name(), "source": str(src), "seconds": round(time.time() - t0, 1)}
        (tmp / comp / quant.QUANT_FILE).write_text(json.dumps(records[comp], indent=1) + "\n")
    index = json.loads((src / "model_index.json").read_text())
    index["_tessera_optimized"] = {comp: f"int8 static ({comp}/{quant.QUANT_FILE}); Tessera loads it, diffusers cannot"
                                   for comp in records}
    (tmp / "model_index.json").unlink()
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    (tmp / "OPTIMIZED.md").write_text(_card(records, str(src)))
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    unet = records["unet"]
    return {"quantized": unet["quantized"], "kept": unet["kept"], "seconds": round(time.time() - t0, 1),
            "out": str(out)} | ({"vae_quantized": records["vae"]["quantized"]} if "vae" in records else {})


def _weights_file(folder: Path) -> Path:
    from tessera.pipelines.stable_diffusion import weights_file

    return weights_file(folder, "diffusion_pytorch_model", None)


def _save_state(net, source: Path, dest: Path) -> None:
    """The network's state in the source file's float dtype (int8 weights as they are; scales and calibrated
    ranges in float32, as computed)."""
    from safetensors.torch import save_file

    float_dtype = _stored_float_dtype(source)
    exact = ("weight_scale", "input_range", "output_range", "accum_range")
    state = {k: (v.to(float_dtype) if v.is_floating_point() and not k.endswith(exact) else v).contiguous()
             for k, v in net.state_dict().items()}
    save_file(state, str(dest))


def _cpu_name() -> str:
    """The CPU the layers were timed on ("speed" selection is for it)."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _stored_float_dtype(path: Path) -> torch.dtype:
    """The float dtype the source file holds its weights in (the int8 folder keeps the rest in it)."""
    import struct

    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    names = {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    return {"BF16": torch.bfloat16, "F16": torch.float16}.get(next(iter(names & {"BF16", "F16"}), ""), torch.float32)


def _card(records: dict, source: str) -> str:
    parts = [f"# Optimized: static int8\n\nMade by `tessera optimize --int8` from `{source}`.\n"]
    for comp, record in records.items():
        kept = "\n".join(f"- `{k}`: {v}" for k, v in sorted(record["kept"].items())) or "- none"
        parts.append(f"## {comp}\n\n{record['scheme']}.\n\n{len(record['quantized'])} layers int8; these stayed "
                     f"float:\n\n{kept}\n")
    prompts = len(next(iter(records.values()))["calibration"]["prompts"])
    parts.append(f"Calibrated on {prompts} held-out prompts; layers chosen by speed on {_cpu_name()}. The speed "
                 f"ratio and quality change are measured by `benchmarks/bench_optimize.py` (benchmarks/RESULTS.md).\n")
    return "\n".join(parts)
