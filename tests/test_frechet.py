"""Fréchet distance and KID: against scipy's sqrtm formula and an explicit-loop MMD, exact repeats, CLI."""
import json

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import photo_like
from tessera.cli import main
from tessera.eval.frechet import frechet_distance, kernel_distance, statistics


def scipy_frechet(mu1, s1, mu2, s2):
    """The formula as pytorch-fid computes it (scipy.linalg.sqrtm of the product)."""
    linalg = pytest.importorskip("scipy.linalg")
    covmean = linalg.sqrtm(s1.dot(s2))
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


def test_frechet_matches_scipy_sqrtm_reference():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 16)), rng.normal(size=(150, 16)) @ rng.normal(size=(16, 16)) * 0.5 + 0.3
    ours = frechet_distance(*statistics(a), *statistics(b))
    ref = scipy_frechet(*statistics(a), *statistics(b))
    assert ours > 1 and abs(ours - ref) < 1e-6 * abs(ref)
    mu, s = statistics(a)
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-8
    assert frechet_distance(mu, s, mu + 2.0, s) == pytest.approx(4.0 * 16, rel=1e-9)  # ||delta||^2
    with pytest.raises(ValueError, match="mismatched"):
        frechet_distance(mu, s, mu[:3], s)


def test_kid_equals_an_explicit_loop_mmd():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(12, 5)), rng.normal(size=(12, 5)) + 0.5
    k = lambda u, v: (u @ v / 5 + 1) ** 3  # noqa: E731
    m = len(x)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    kid, std = kernel_distance(x, y, subsets=1, subset_size=m)  # the whole sets: order does not matter
    assert kid == pytest.approx(xx + yy - 2 * xy, rel=1e-10) and std == 0
    a, b, c = rng.normal(size=(300, 5)), rng.normal(size=(300, 5)), rng.normal(size=(300, 5)) + 0.5
    same, _ = kernel_distance(a, b, subsets=5, subset_size=200)  # two samples of one distribution
    shifted, _ = kernel_distance(a, c, subsets=5, subset_size=200)
    assert abs(same) < 0.05 * shifted


def test_eval_fid_cli_is_exactly_reproducible_and_names_its_features(tmp_path):
    real, fake, empty = tmp_path / "real", tmp_path / "fake", tmp_path / "empty"
    for d in (real, fake, empty):
        d.mkdir()
    for i in range(6):
        photo_like(i, (64, 64)).save(real / f"{i}.png")
        photo_like(100 + i, (64, 64)).rotate(90).save(fake / f"{i}.png")
    r = CliRunner()
    args = ["eval", "fid", "--real", str(real), "--fake", str(fake), "--kid-subsets", "10"]
    first, second = r.invoke(main, args), r.invoke(main, args)
    assert first.exit_code == 0, first.output
    assert first.output == second.output  # same files -> the same digits
    out = json.loads(first.output)
    assert "NOT Inception" in out["feature_space"] and out["n_real"] == out["n_fake"] == 6
    assert out["frechet_distance"] > 0
    self_out = json.loads(r.invoke(main, ["eval", "fid", "--real", str(real), "--fake", str(real)]).output)
    assert abs(self_out["frechet_distance"]) < 1e-6 * out["frechet_distance"]
    bad = r.invoke(main, ["eval", "fid", "--real", str(real), "--fake", str(empty)])
    assert bad.exit_code != 0 and "at least 2 images" in bad.output


def test_inception_score_formula_extremes():
    from tessera.eval.frechet import inception_score

    uniform = np.zeros((40, 10))
    assert inception_score(uniform, splits=4)[0] == pytest.approx(1.0)
    confident = np.full((40, 10), -50.0)
    confident[np.arange(40), np.arange(40) % 10] = 50.0  # each image sure of one class, all 10 used equally
    mean, std = inception_score(confident, splits=4, seed=None)  # file order: every split holds all 10
    assert mean == pytest.approx(10.0, rel=1e-6) and std < 1e-6


def test_eval_fid_with_inception_weights_file(tmp_path):
    import torch

    from tessera.eval.inception import FIDInceptionV3

    real, fake = tmp_path / "real", tmp_path / "fake"
    real.mkdir(), fake.mkdir()
    for i in range(4):
        photo_like(i, (48, 40)).save(real / f"{i}.png")
        photo_like(50 + i, (40, 48)).save(fake / f"{i}.png")  # sizes differ: each image is resized alone
    torch.manual_seed(0)
    torch.save(FIDInceptionV3().state_dict(), tmp_path / "inception.pth")  # random weights, same format
    res = CliRunner().invoke(main, ["eval", "fid", "--real", str(real), "--fake", str(fake), "--kid-subsets", "3",
                                    "--inception-weights", str(tmp_path / "inception.pth")])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["feature_space"].startswith("Inception-v3") and out["inception_score"] >= 1.0
    bad = CliRunner().invoke(main, ["eval", "fid", "--real", str(real), "--fake", str(fake),
                                    "--inception-weights", str(tmp_path / "missing.pth")])
    assert bad.exit_code != 0 and "pt_inception" in bad.output
