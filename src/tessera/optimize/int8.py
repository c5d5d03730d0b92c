"""Static int8 for a Stable Diffusion pipeline folder (nn/quant.py's scheme: u8 activations per tensor, s8
weights per channel, oneDNN's int8 kernels, float elsewhere).

    tessera optimize DIR --int8 -o OUT

Calibration runs the float pipeline on held-out prompts (not the evaluation prompts) at the size and step
count it will serve, watching every Conv2d / Linear input of the U-Net; the layers `quant.keep_reason` keeps
stay float, with the reason in the report. OUT is the same diffusers folder layout with `unet/` holding the
int8 state and `unet/quantization.json` (which layers, the calibration); the other components are copied
unchanged (hard links where the file system allows). Tessera loads it (`tessera.load(OUT)`); diffusers
cannot (its U-Net has no int8 layers), which model_index.json's `_tessera_optimized` says.
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


def calibrate(pipe, prompts: list[str], size: int | None, steps: int | None) -> dict[str, dict]:
    """The U-Net's layer input ranges over a pipeline call per prompt (its own defaults unless given)."""
    from tessera.nn import quant

    kw = {} if steps is None else {"num_inference_steps": steps}
    if size is not None:
        kw.update(height=size, width=size)

    def run():
        for i, prompt in enumerate(prompts):
            pipe(prompt, generator=torch.Generator().manual_seed(i), output_type="pt", **kw)

    with pipe.unpacked():  # the plain layers (prepacked ones bypass the hooks' modules' forward)
        pipe.prepack = False
        return quant.observe_inputs(pipe.generator, run)


def quantize_sd_folder(src: str | Path, out: str | Path, prompts: list[str] | None = None, size: int | None = None,
                       steps: int | None = None, dtype: str | None = None) -> dict:
    """DIR (a diffusers Stable Diffusion folder) -> OUT with a static int8 U-Net; -> the report."""
    from safetensors.torch import save_file

    from tessera.nn import onednn, quant
    from tessera.nn.quant import QUANT_FILE
    from tessera.pipelines.stable_diffusion import is_diffusers_folder, load_diffusers_folder, weights_file

    src, out = Path(src), Path(out)
    if not is_diffusers_folder(src):
        raise InvalidInputError(f"{src}: --int8 takes a diffusers Stable Diffusion folder (model_index.json)")
    if (src / "unet" / QUANT_FILE).is_file():
        raise InvalidInputError(f"{src}: its U-Net is already int8")
    if out.exists() and any(out.iterdir()):
        raise InvalidInputError(f"-o {out}: not empty (an optimized folder is never written over another)")
    if not quant.static_available():
        raise InvalidInputError("this torch build has no oneDNN int8 kernels (torch.ops.onednn.qconv_pointwise)")
    from tessera.device import placement

    t0 = time.time()
    pipe = load_diffusers_folder(src, placement(None, dtype))
    prompts = list(prompts or CALIBRATION_PROMPTS)
    stats = calibrate(pipe, prompts, size, steps)
    unet = pipe.generator
    onednn.unpack(unet)
    report = quant.quantize_static(unet, stats)
    stored = weights_file(src / "unet", "diffusion_pytorch_model", None)
    tmp = out.with_name(out.name + ".incoming")
    shutil.rmtree(tmp, ignore_errors=True)
    _copy_tree(src, tmp, skip={stored})
    float_dtype = _stored_float_dtype(stored)
    state = {k: (v.to(float_dtype) if v.is_floating_point() and not k.endswith(("weight_scale", "input_range"))
                 else v).contiguous() for k, v in unet.state_dict().items()}
    save_file(state, str(tmp / "unet" / stored.name))
    record = {"scheme": "static int8: u8 activations per tensor (calibrated range), s8 weights per output "
                        "channel, oneDNN kernels; float elsewhere", "quantized": report["quantized"],
              "kept": report["kept"], "calibration": {"prompts": prompts, "size": size, "steps": steps,
                                                      "ranges": {k: [v["lo"], v["hi"]] for k, v in stats.items()}},
              "source": str(src), "seconds": round(time.time() - t0, 1)}
    (tmp / "unet" / QUANT_FILE).write_text(json.dumps(record, indent=1) + "\n")
    index = json.loads((src / "model_index.json").read_text())
    index["_tessera_optimized"] = {"unet": "int8 static (unet/quantization.json); Tessera loads it, diffusers cannot"}
    (tmp / "model_index.json").unlink()
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    (tmp / "OPTIMIZED.md").write_text(_card(record))
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return {k: record[k] for k in ("quantized", "kept", "seconds")} | {"out": str(out)}


def _stored_float_dtype(path: Path) -> torch.dtype:
    """The float dtype the source file holds its weights in (the int8 folder keeps the rest in it)."""
    import struct

    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    names = {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    return {"BF16": torch.bfloat16, "F16": torch.float16}.get(next(iter(names & {"BF16", "F16"}), ""), torch.float32)


def _card(record: dict) -> str:
    kept = "\n".join(f"- `{k}`: {v}" for k, v in sorted(record["kept"].items())) or "- none"
    return (f"# Optimized: static int8 U-Net\n\nMade by `tessera optimize --int8` from `{record['source']}`.\n\n"
            f"{record['scheme']}.\n\n{len(record['quantized'])} layers int8; these stayed float:\n\n{kept}\n\n"
            f"Calibrated on {len(record['calibration']['prompts'])} held-out prompts. The speed ratio and quality change "
            f"are measured by `benchmarks/bench_optimize.py` (benchmarks/RESULTS.md).\n")
