"""Distribution distances between two sets of images, computed on features of a fixed network.

* Fréchet distance (Heusel et al. 2017, the "FID" formula):
      d^2 = ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2})
  with Tr((S_1 S_2)^{1/2}) = sum_i sqrt(lambda_i(S_1^{1/2} S_2 S_1^{1/2})), eigenvalues of a symmetric
  PSD matrix, in float64 (no complex sqrtm).
* Kernel distance (Binkowski et al. 2018, "KID"): the unbiased MMD^2 with the cubic polynomial kernel
  k(x, y) = (x.y / d + 1)^3, averaged over random subsets, with its standard deviation.

The feature space is named in every result. Offline here: the pooled 1024-d features of the pretrained
open_nsfw ResNet-50 (`tokenizer.perceptual`), which are NOT Inception features: the numbers are not
comparable to published FID / KID.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

OPEN_NSFW_SPACE = "open_nsfw ResNet-50 global-average-pooled features (1024-d), 224x224 bilinear; NOT Inception"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"mismatched statistics: mu {mu1.shape} / {mu2.shape}, sigma {s1.shape} / {s2.shape}")
    r = _sqrt_psd(s1)
    eig = np.linalg.eigvalsh(r @ s2 @ r)
    tr_covmean = float(np.sqrt(np.clip(eig, 0, None)).sum())
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D,D] of features [N,D] (float64)."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need features [N>=2, D], got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """k(x, y) = (x.y / d + 1)^3, KID's kernel (Binkowski et al. 2018): [n, d], [m, d] -> [n, m]."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def kernel_distance(f1: np.ndarray, f2: np.ndarray, subsets: int = 100, subset_size: int = 1000,
                    seed: int = 2020) -> tuple[float, float]:
    """KID: mean and std over `subsets` random subsets of the unbiased polynomial-kernel MMD^2. Subsets
    are drawn as torch-fidelity draws them (RandomState(seed).choice, its default seed 2020), so the
    same features give the same number in both."""
    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    m = min(subset_size, len(f1), len(f2))
    if m < 2:
        raise ValueError("KID needs at least 2 images on each side")
    rng, vals = np.random.RandomState(seed), []
    for _ in range(subsets):
        x = f1[rng.choice(len(f1), m, replace=False)]
        y = f2[rng.choice(len(f2), m, replace=False)]
        kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
        off = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        vals.append(off - 2 * kxy.mean())
    return float(np.mean(vals)), float(np.std(vals))


def list_images(folder: str | Path) -> list[Path]:
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) < 2:
        raise ValueError(f"{folder}: needs at least 2 images ({', '.join(sorted(IMAGE_SUFFIXES))}), found {len(files)}")
    return files


@torch.no_grad()
def open_nsfw_pooled(images: list[Image.Image], net=None, batch: int = 32) -> np.ndarray:
    """[N, 1024] pooled features of RGB images, each resized to 224x224 (Pillow bilinear)."""
    from tessera.data.dataset import to_tensor
    from tessera.tokenizer.perceptual import load_open_nsfw

    net = net if net is not None else load_open_nsfw()
    out = []
    for s in range(0, len(images), batch):
        x = torch.stack([to_tensor(im.resize((224, 224), Image.Resampling.BILINEAR)) for im in images[s:s + batch]])
        out.append(net.features(x)[-1].mean(dim=(2, 3)).double().numpy())  # (B, 1024, 7, 7) -> (B, 1024)
    return np.concatenate(out)


def read_image(f: Path) -> Image.Image:
    """Safely decoded RGB image, or a ValueError naming the file."""
    from tessera.data.decode import Rejected, decode_image

    try:
        return decode_image(f.read_bytes())
    except Rejected as e:
        raise ValueError(f"{f}: not a readable image ({e})") from None


def open_nsfw_features(files: list[Path], net=None) -> np.ndarray:
    """`open_nsfw_pooled` of image files."""
    return open_nsfw_pooled([read_image(f) for f in files], net)


INCEPTION_SPACE = ("Inception-v3 pt_inception-2015-12-05 pool3 (2048-d), native-size images resized to 299 "
                   "bilinear: the pytorch-fid / torch-fidelity FID space")


@torch.no_grad()
def inception_outputs(files: list[Path], net) -> tuple[np.ndarray, np.ndarray]:
    """pool3 features [N, 2048] and logits [N, 1008]; each image at its own size, in [0, 1] (pytorch-fid)."""
    from tessera.data.dataset import to_tensor

    feats, logits = [], []
    for f in files:
        pool, lg = net((to_tensor(read_image(f))[None] + 1) / 2)  # [0, 1], the image's own size
        feats.append(pool.double().numpy())
        logits.append(lg.double().numpy())
    return np.concatenate(feats), np.concatenate(logits)


def inception_score(logits: np.ndarray, splits: int = 10, seed: int | None = 2020) -> tuple[float, float]:
    """IS = exp(E_x KL(p(y|x) || p(y))) per split of the images (Salimans et al. 2016): mean and std.
    Rows are shuffled with RandomState(seed) and split at i*N//splits, as torch-fidelity does
    (seed None: file order)."""
    z = np.asarray(logits, np.float64)
    if seed is not None:
        z = z[np.random.RandomState(seed).permutation(len(z))]
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    n, scores = len(p), []
    for i in range(splits):
        part = p[i * n // splits:(i + 1) * n // splits]
        py = part.mean(0, keepdims=True)
        kl = (part * (np.log(np.clip(part, 1e-30, None)) - np.log(np.clip(py, 1e-30, None)))).sum(1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def compare_folders(real: str | Path, fake: str | Path, kid_subsets: int = 100, kid_subset_size: int = 1000,
                    inception_weights: str | Path | None = None) -> dict:
    """Fréchet and kernel distance between two folders of images: in the standard Inception space when
    its weights file is given (plus the Inception Score of the fake images), else in open_nsfw's."""
    fr, ff = list_images(real), list_images(fake)
    extra: dict = {}
    if inception_weights:
        from tessera.eval.inception import load_fid_inception

        net = load_fid_inception(inception_weights)
        (a, _), (b, logits) = inception_outputs(fr, net), inception_outputs(ff, net)
        space = INCEPTION_SPACE
        extra["inception_score"], extra["inception_score_std"] = inception_score(logits, min(10, len(ff)))
    else:
        a, b, space = open_nsfw_features(fr), open_nsfw_features(ff), OPEN_NSFW_SPACE
    kid, kid_std = kernel_distance(a, b, kid_subsets, kid_subset_size)
    return {"feature_space": space, "frechet_distance": frechet_distance(*statistics(a), *statistics(b)),
            "kid": kid, "kid_std": kid_std, **extra, "n_real": len(fr), "n_fake": len(ff)}
