"""The training pipeline: data -> train -> evaluate -> gate -> promote; a deliberately degraded candidate is
rejected with a report saying why, and the deployed model stays."""
import hashlib
import json

import pytest
from click.testing import CliRunner

from conftest import tiny_preset
from tessera.cli import main
from tessera.eval.gate import gate


def test_gate_compares_each_metric_in_its_direction():
    deployed = {"nll_true": 4.0, "frac_true_better": 0.70}
    ok = gate({"nll_true": 4.01, "frac_true_better": 0.75}, deployed, {"nll_true": 0.02, "frac_true_better": 0.02})
    assert ok.promote and all(c["ok"] for c in ok.compared.values())
    bad = gate({"nll_true": 4.5, "frac_true_better": 0.69}, deployed, {"nll_true": 0.02, "frac_true_better": 0.02})
    assert not bad.promote and bad.reasons[0].startswith("nll_true: candidate 4.5 vs deployed 4 (worse by 0.5")
    assert bad.compared["frac_true_better"]["ok"]  # 0.01 worse: within its tolerance
    assert gate({"nll_true": 9.0}, None, {"nll_true": 0.0}).promote  # nothing deployed yet
    with pytest.raises(ValueError, match="unknown metrics"):
        gate(deployed, deployed, {"fid": 1.0})
    with pytest.raises(ValueError, match="missing from the candidate"):
        gate({}, deployed, {"nll_true": 0.1})


def config(tmp_path, data, tok, steps):
    return {"name": "tiny-ar", "workdir": str(tmp_path / "runs"), "deployed": str(tmp_path / "deployed"),
            "data": {"prepared": str(data)},
            "train": {"task": "ar", "preset": tiny_preset("ar-tiny"), "max_steps": steps, "tokenizer": str(tok),
                      "text_encoder": "tiny", "overrides": ["train.batch_size=8", "train.lr=0.003",
                                                            "train.warmup_steps=2", "train.val_every=0"]},
            "evaluate": {"prompts": ["a synthetic picture number 1", "a red apple"]},
            "gate": {"tolerances": {"nll_true": 0.05, "frac_true_better": 0.5}}}


def test_pipeline_promotes_then_rejects_a_degraded_candidate(tiny_dataset, tiny_model, tmp_path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps(config(tmp_path, tiny_dataset, tiny_model, 40)))
    r = CliRunner().invoke(main, ["workflow", "run", str(good), "--run-id", "first"])
    assert r.exit_code == 0, r.output
    first = json.loads((tmp_path / "runs" / "first" / "report.json").read_text())
    assert first["promoted"] and first["metrics"]["deployed"] is None
    assert (tmp_path / "runs" / "first" / "samples.png").is_file()
    weights = tmp_path / "deployed" / "model.safetensors"
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()

    degraded = tmp_path / "degraded.json"
    degraded.write_text(json.dumps(config(tmp_path, tiny_dataset, tiny_model, 1)))  # one step: barely trained
    r = CliRunner().invoke(main, ["workflow", "run", str(degraded), "--run-id", "second"])
    assert r.exit_code == 3, r.output
    report = json.loads((tmp_path / "runs" / "second" / "report.json").read_text())
    assert not report["promoted"] and report["decision"]["compared"]["nll_true"]["ok"] is False
    assert report["metrics"]["candidate"]["nll_true"] > report["metrics"]["deployed"]["nll_true"] + 0.05
    md = (tmp_path / "runs" / "second" / "report.md").read_text()
    assert md.startswith("# Pipeline run tiny-ar: REJECTED") and "- nll_true: candidate" in md and "worse by" in md
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == sha  # the deployed model did not change
    r = CliRunner().invoke(main, ["workflow", "run", str(degraded), "--run-id", "second"])
    assert r.exit_code != 0 and "own folder" in r.output


def test_pipeline_under_torchrun_trains_on_two_ranks_and_rank0_reports(tiny_dataset, tiny_model, tmp_path):
    import os
    import subprocess
    import sys

    from conftest import free_port

    cfg = config(tmp_path, tiny_dataset, tiny_model, 6)
    cfg["train"]["overrides"] = ["train.batch_size=4", "train.val_every=0", "train.strategy=\"fsdp\""]
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        f"--master_port={free_port()}", "-m", "tessera.cli", "workflow", "run", str(path),
                        "--run-id", "dist"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "runs" / "dist" / "report.json").read_text())
    assert report["promoted"] and (tmp_path / "deployed" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "runs" / "dist" / "train" / "run.json").read_text())["train"]["strategy"] == "fsdp"


def test_an_optimize_step_whose_student_lost_quality_is_rejected(tiny_dataset, tiny_model, tmp_path):
    """The workflow's optimize step (few-step distillation) gated on sample metrics: a student distilled with a
    learning rate that wrecks it is rejected, with the metrics saying why, and the deployed teacher stays."""
    import shutil

    r = CliRunner().invoke(main, ["train", "diffusion", "--data", str(tiny_dataset), "--out", str(tmp_path / "t"),
                                  "--preset", tiny_preset("unet-tiny"), "--tokenizer", str(tiny_model), "--text-encoder",
                                  "tiny", "--max-steps", "30", "--set", "train.batch_size=8", "--set", "train.val_every=0",
                                  "--set", "train.lr=0.003", "--set", "train.warmup_steps=2"])
    assert r.exit_code == 0, r.output
    assert CliRunner().invoke(main, ["export", str(tmp_path / "t"), "-o", str(tmp_path / "teacher")]).exit_code == 0
    shutil.copytree(tmp_path / "teacher", tmp_path / "deployed")
    clip = tmp_path / "clip"
    r = CliRunner().invoke(main, ["train", "contrastive", "--data", str(tiny_dataset), "--out", str(tmp_path / "c"),
                                  "--preset", tiny_preset("clip-tiny"), "--text-encoder", "tiny", "--max-steps", "3",
                                  "--set", "train.batch_size=8", "--set", "train.val_every=0"])
    assert r.exit_code == 0 and CliRunner().invoke(main, ["export", str(tmp_path / "c"), "-o", str(clip)]).exit_code == 0
    cfg = {"name": "distill", "workdir": str(tmp_path / "runs"), "deployed": str(tmp_path / "deployed"),
           "data": {"prepared": str(tiny_dataset)}, "train": {"text_encoder": "tiny"},
           "optimize": {"source": str(tmp_path / "teacher"), "distill_steps": 2, "max_steps": 4,
                        "overrides": ["train.batch_size=8", "train.val_every=0", "train.lr=3.0", "train.warmup_steps=1",
                                      "task.teacher_steps=6", "train.ema_decay=0.0"]},
           "evaluate": {"metrics": "samples", "limit": 4, "clip": str(clip), "prompts": ["a synthetic picture number 1"]},
           "gate": {"tolerances": {"fd": 1.0, "kid": 0.01}, "bootstrap": 0}}  # 4 images: point estimates
    (tmp_path / "w.json").write_text(json.dumps(cfg))
    weights = tmp_path / "deployed" / "model.safetensors"
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    r = CliRunner().invoke(main, ["workflow", "run", str(tmp_path / "w.json"), "--run-id", "opt"])
    assert r.exit_code == 3, r.output
    report = json.loads((tmp_path / "runs" / "opt" / "report.json").read_text())
    cand, dep = report["metrics"]["candidate"], report["metrics"]["deployed"]
    assert set(cand) == {"fd", "kid", "clipscore", "r_precision"} and cand["fd"] > dep["fd"] + 1.0
    assert not report["promoted"] and report["decision"]["compared"]["fd"]["ok"] is False
    assert json.loads((tmp_path / "runs" / "opt" / "candidate" / "meta.json").read_text())["task"]["student_steps"] == 2
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == sha  # the deployed model did not change
    from tessera.train.workflow import WorkflowConfig, _intervals

    ci = _intervals(tmp_path / "runs" / "opt", WorkflowConfig.from_dict({**cfg, "gate": {**cfg["gate"], "bootstrap": 50}}))
    assert set(ci) == {"fd", "kid", "clipscore", "r_precision"} and all(lo <= hi for lo, hi in ci.values())
    assert ci["fd"][1] > 0  # the wrecked student: worse in FD at the upper end at least


def test_an_optimize_step_takes_exactly_one_optimization(tmp_path, monkeypatch):
    from tessera.train import int8 as weight_only
    from tessera.train.workflow import OptimizeStep, optimize_step

    for step in (OptimizeStep(source="masked-xxs"), OptimizeStep(source="unet-xs", distill_steps=4, prune=0.5)):
        with pytest.raises(ValueError, match="give one of distill_steps, prune or int8"):
            optimize_step(step, str(tmp_path), tmp_path)
    monkeypatch.setattr(weight_only, "_generation_seconds", lambda pipes, calls: {"float": 0.3, "int8": 0.2})
    candidate = optimize_step(OptimizeStep(source="ar-xs", int8=True), str(tmp_path), tmp_path)  # weight-only int8
    assert json.loads((candidate / "meta.json").read_text())["quantization"]["scheme"].startswith("int8 weight-only")
