"""Our FID Inception-v3 against pytorch-fid's, with the same random weights (the real weights cannot be
downloaded here), and our KID / IS against torch-fidelity's. Both need torchvision; the only PyPI torchvision for torch 2.13 is the CUDA
build, whose C++ ops do not load beside CPU torch, so set-up unpacks it (and pytorch-fid, torch-fidelity) into
.venv/fid-reference, used only here, and two op schemas are declared so its Python code imports."""
import sys
from pathlib import Path

import pytest
import torch

from tessera.eval.inception import FIDInceptionV3, load_fid_inception

REF = Path(__file__).resolve().parents[1] / ".venv" / "fid-reference"


@pytest.fixture(scope="module")
def references():
    """pytorch_fid.inception, torch_fidelity.metric_kid, torch_fidelity.metric_isc."""
    if not (REF / "pytorch_fid").is_dir() or not (REF / "torch_fidelity").is_dir():
        pytest.skip("scripts/setup.sh unpacks pytorch-fid and torch-fidelity into .venv/fid-reference")
    if not hasattr(torch.ops.torchvision, "nms"):
        lib = torch.library.Library("torchvision", "DEF")  # what torchvision's missing C++ ops would declare
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        references.lib = lib  # keep the registration alive
    sys.path.insert(0, str(REF))
    try:
        from pytorch_fid import inception
        from torch_fidelity import metric_isc, metric_kid
    finally:
        sys.path.remove(str(REF))
    yield inception, metric_kid, metric_isc
    for name in [n for n in sys.modules if n.split(".")[0] in ("torchvision", "pytorch_fid", "torch_fidelity")]:
        del sys.modules[name]  # later tests (transformers, diffusers) must not see this torchvision


@pytest.fixture(scope="module")
def pytorch_fid(references):
    return references[0]


def test_kid_and_inception_score_equal_torch_fidelity(references):
    from tessera.eval.frechet import inception_score, kernel_distance

    _, metric_kid, metric_isc = references
    g = torch.Generator().manual_seed(0)
    f1, f2 = torch.randn(60, 32, generator=g, dtype=torch.float64), torch.randn(50, 32, generator=g, dtype=torch.float64) + 0.3
    ref = metric_kid.kid_features_to_metric(f1, f2, kid_subsets=7, kid_subset_size=40, rng_seed=2020, verbose=False,
                                            kid_kernel="poly", kid_degree=3, kid_gamma=None, kid_coef0=1)
    ours = kernel_distance(f1.numpy(), f2.numpy(), subsets=7, subset_size=40, seed=2020)
    assert ours[0] == pytest.approx(ref["kernel_inception_distance_mean"], rel=1e-9)
    assert ours[1] == pytest.approx(ref["kernel_inception_distance_std"], rel=1e-9)
    logits = torch.randn(53, 1008, generator=g, dtype=torch.float64) * 3
    ref = metric_isc.isc_features_to_metric(logits, splits=10, shuffle=True, rng_seed=2020)
    mean, std = inception_score(logits.numpy(), splits=10, seed=2020)
    assert mean == pytest.approx(ref["inception_score_mean"], rel=1e-9) and mean > 1
    assert std == pytest.approx(ref["inception_score_std"], rel=1e-9)


def randomised(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights and batch-norm statistics that keep activations O(1) through 94 conv layers."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(1 + 0.5 * torch.rand(m.running_var.shape, generator=g))
            elif isinstance(m, torch.nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.02)
    return model.eval()


def test_features_and_logits_equal_pytorch_fid(pytorch_fid, monkeypatch):
    ours = randomised(FIDInceptionV3())

    def fid_inception_v3():  # pytorch-fid's builder, minus the download: the same patched torchvision net
        net = pytorch_fid._inception_v3(num_classes=1008, aux_logits=False, weights=None)
        net.Mixed_5b = pytorch_fid.FIDInceptionA(192, pool_features=32)
        net.Mixed_5c = pytorch_fid.FIDInceptionA(256, pool_features=64)
        net.Mixed_5d = pytorch_fid.FIDInceptionA(288, pool_features=64)
        net.Mixed_6b = pytorch_fid.FIDInceptionC(768, channels_7x7=128)
        net.Mixed_6c = pytorch_fid.FIDInceptionC(768, channels_7x7=160)
        net.Mixed_6d = pytorch_fid.FIDInceptionC(768, channels_7x7=160)
        net.Mixed_6e = pytorch_fid.FIDInceptionC(768, channels_7x7=192)
        net.Mixed_7b = pytorch_fid.FIDInceptionE_1(1280)
        net.Mixed_7c = pytorch_fid.FIDInceptionE_2(2048)
        net.load_state_dict(ours.state_dict(), strict=True)  # every name and shape agrees
        return net

    monkeypatch.setattr(pytorch_fid, "fid_inception_v3", fid_inception_v3)
    ref = pytorch_fid.InceptionV3([3], resize_input=True, normalize_input=True, use_fid_inception=True).eval()
    x = torch.rand(2, 3, 96, 80, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        feats, logits = ours(x)
        ref_feats = ref(x)[0].flatten(1)  # (B, 2048)
        ref_logits = fid_inception_v3().fc(ref_feats)
    assert feats.shape == (2, 2048) and feats.abs().mean() > 1e-3
    torch.testing.assert_close(feats, ref_feats, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-5)


def test_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05"):
        load_fid_inception(tmp_path / "nope.pth")
