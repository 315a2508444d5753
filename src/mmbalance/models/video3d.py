"""3D-ResNet video encoders (torchvision's video ResNets): ``r3d_18``, ``r2plus1d_18``, ``mc3_18``.

Input ``(B, C, T, H, W)`` (channels, frames, height, width: the layout of torchvision's video
models and of this toolkit's frame datasets); output the globally average-pooled layer4 map,
``(B, 8 * width)``.

The networks are torchvision's ``VideoResNet`` family built from torchvision's own blocks
(``BasicBlock`` with ``Conv3DSimple`` / ``Conv2Plus1D`` / ``Conv3DNoTemporal``, layers
[2, 2, 2, 2]), without ``avgpool``/``fc``, and with two additions:

* ``in_channels``: 3 for RGB, 1 for depth, 2 for optical flow (u, v). A state dict with a
  3-channel stem loads into another channel count by averaging the stem kernel over its input
  channels and replicating it (the cross-modality initialisation of TSN / I3D for flow).
* ``width``: the base channel width; 64 is torchvision's network, whose state dicts (e.g.
  ``torchvision.models.video.r3d_18(weights="KINETICS400_V1").state_dict()`` saved to a file on
  a machine that can download) load as they are; smaller widths make CPU runs feasible.

Weights load only from a local file (``weights``), never downloaded. Initialisation without
weights is torchvision's: Conv3d ``kaiming_normal_(mode="fan_out")``, BatchNorm 1 / 0.

Where this stands in for I3D: the MIE/IGM code (``njustkmg/IJCAI25-IGM``
``models/RODModel.py``) encodes each NVGesture stream with an Inception-I3D (piergiaj's
pytorch-i3d, ImageNet-inflated weights). torchvision has no I3D; ``r3d_18`` / ``r2plus1d_18``
are the closest 3D CNNs it ships, so NVGesture numbers with these encoders are not the
papers' I3D numbers.
"""
from __future__ import annotations

import os
from typing import Annotated

import torch
from torch import nn
from torchvision.models.video.resnet import BasicBlock, Conv2Plus1D, Conv3DNoTemporal, Conv3DSimple

from ..options import Interval
from ..registry import ConfigError
from .encoders import register_encoder

__all__ = ["VideoResNetTrunk", "VideoResNetEncoder", "load_video_weights", "adapt_stem_kernel", "ARCHS"]

# arch -> (conv builder per stage, stem kind)
ARCHS = {
    "r3d_18": ([Conv3DSimple] * 4, "r3d"),
    "mc3_18": ([Conv3DSimple] + [Conv3DNoTemporal] * 3, "r3d"),
    "r2plus1d_18": ([Conv2Plus1D] * 4, "r2plus1d"),
}


def _stem(kind: str, in_channels: int, width: int) -> nn.Sequential:
    if kind == "r3d":
        return nn.Sequential(
            nn.Conv3d(in_channels, width, kernel_size=(3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False),
            nn.BatchNorm3d(width), nn.ReLU(inplace=True))
    mid = max(1, round(45 * width / 64))  # torchvision: 45 mid channels at width 64
    return nn.Sequential(
        nn.Conv3d(in_channels, mid, kernel_size=(1, 7, 7), stride=(1, 2, 2), padding=(0, 3, 3), bias=False),
        nn.BatchNorm3d(mid), nn.ReLU(inplace=True),
        nn.Conv3d(mid, width, kernel_size=(3, 1, 1), stride=(1, 1, 1), padding=(1, 0, 0), bias=False),
        nn.BatchNorm3d(width), nn.ReLU(inplace=True))


class VideoResNetTrunk(nn.Module):
    """torchvision's VideoResNet-18 without ``avgpool``/``fc``, any ``in_channels`` and ``width``.

    Module names match torchvision's (``stem``, ``layer1`` ... ``layer4``), so its state dict
    loads into ``width=64``.
    """

    def __init__(self, arch: str = "r3d_18", in_channels: int = 3, width: int = 64):
        super().__init__()
        if arch not in ARCHS:
            raise ConfigError(f"unknown video ResNet '{arch}'; valid: {', '.join(ARCHS)}")
        makers, stem = ARCHS[arch]
        self.arch = arch
        self.stem = _stem(stem, in_channels, width)
        self.inplanes = width
        self.layer1 = self._make_layer(makers[0], width, 2, 1)
        self.layer2 = self._make_layer(makers[1], 2 * width, 2, 2)
        self.layer3 = self._make_layer(makers[2], 4 * width, 2, 2)
        self.layer4 = self._make_layer(makers[3], 8 * width, 2, 2)
        self.out_channels = 8 * width
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, maker, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            ds = maker.get_downsample_stride(stride)
            downsample = nn.Sequential(nn.Conv3d(self.inplanes, planes, kernel_size=1, stride=ds, bias=False),
                                       nn.BatchNorm3d(planes))
        layers = [BasicBlock(self.inplanes, planes, maker, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes, maker) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))


def adapt_stem_kernel(w: torch.Tensor, in_channels: int) -> torch.Tensor:
    """A stem kernel (out, c, t, h, w) for ``in_channels`` inputs: the mean over its c input
    channels, replicated (TSN/I3D cross-modality initialisation); unchanged when c fits.

    >>> adapt_stem_kernel(torch.ones(2, 3, 1, 1, 1) * torch.tensor([1., 2., 6.]).view(1, 3, 1, 1, 1), 2)[0, :, 0, 0, 0].tolist()
    [3.0, 3.0]
    """
    if w.shape[1] == in_channels:
        return w
    return w.mean(dim=1, keepdim=True).repeat(1, in_channels, *([1] * (w.dim() - 2)))


def load_video_weights(trunk: VideoResNetTrunk, path: str) -> None:
    """Load a local state dict (torchvision's, or a checkpoint holding one under ``state_dict`` /
    ``model``; ``module.`` prefixes stripped, ``fc.*`` ignored) into ``trunk``; a stem made for
    another channel count is adapted by :func:`adapt_stem_kernel`. One-line ``ConfigError`` when
    the file is missing, unreadable or does not fit."""
    if not os.path.isfile(path):
        raise ConfigError(f"encoder weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is a user error
        raise ConfigError(f"cannot read encoder weights {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"encoder weights {path} hold no state dict of tensors")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    stem_w = state.get("stem.0.weight")
    own = trunk.stem[0].weight
    if isinstance(stem_w, torch.Tensor) and stem_w.dim() == 5 and stem_w.shape[1] != own.shape[1]:
        state["stem.0.weight"] = adapt_stem_kernel(stem_w, own.shape[1])
    try:
        trunk.load_state_dict(state, strict=True)
    except RuntimeError as e:
        lines = str(e).splitlines()
        first = lines[1].strip() if len(lines) > 1 else str(e)
        raise ConfigError(f"encoder weights {path} do not fit this {trunk.arch} (check the arch and width): "
                          f"{first}") from None


class VideoResNetEncoder(nn.Module):
    """A video ResNet trunk, global average pooled over time and space to ``(B, out_dim)``."""

    def __init__(self, arch: str = "r3d_18", in_channels: int = 3, width: int = 64, weights: str | None = None):
        super().__init__()
        self.trunk = VideoResNetTrunk(arch, in_channels, width)
        if weights:
            load_video_weights(self.trunk, weights)
        self.out_dim = self.trunk.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x).mean(dim=(2, 3, 4))


def _build(arch: str, input_shape: tuple, in_channels: int | None, width: int, weights: str | None) -> nn.Module:
    if len(input_shape) != 4:
        raise ConfigError(f"encoder '{arch}' expects a clip (channels, frames, height, width) per sample, got "
                          f"shape {tuple(input_shape)}")
    c = int(input_shape[0]) if in_channels is None else int(in_channels)
    if c != int(input_shape[0]):
        raise ConfigError(f"encoder '{arch}' has in_channels={c} but the input has {input_shape[0]} channels "
                          f"(shape {tuple(input_shape)}); drop in_channels or fix it")
    return VideoResNetEncoder(arch, c, width, weights)


PosInt = Annotated[int, Interval(1, None)]
_OPTS = """
    Options:
        in_channels: input channels (default: the input's; 3 RGB, 1 depth, 2 flow).
        width: base channel width; 64 is torchvision's network (out_dim 512).
        weights: a local state dict file (torchvision's layout); never downloaded.
"""


@register_encoder("r3d_18", summary="3D ResNet-18 (torchvision r3d_18) over (C, T, H, W) clips; any channels, width, local weights")
def r3d_18(input_shape: tuple, in_channels: PosInt | None = None, width: PosInt = 64,
           weights: str | None = None) -> nn.Module:
    return _build("r3d_18", input_shape, in_channels, width, weights)


@register_encoder("r2plus1d_18", summary="R(2+1)D-18 (torchvision r2plus1d_18) over (C, T, H, W) clips; any channels, width, local weights")
def r2plus1d_18(input_shape: tuple, in_channels: PosInt | None = None, width: PosInt = 64,
                weights: str | None = None) -> nn.Module:
    return _build("r2plus1d_18", input_shape, in_channels, width, weights)


@register_encoder("mc3_18", summary="mixed-convolution MC3-18 (torchvision mc3_18) over (C, T, H, W) clips; any channels, width, local weights")
def mc3_18(input_shape: tuple, in_channels: PosInt | None = None, width: PosInt = 64,
           weights: str | None = None) -> nn.Module:
    return _build("mc3_18", input_shape, in_channels, width, weights)


for _f, _name in ((r3d_18, "3D ResNet-18"), (r2plus1d_18, "R(2+1)D-18"), (mc3_18, "MC3-18")):
    _f.__doc__ = f"{_name} video encoder over (C, T, H, W) clips; ``out_dim = 8 * width``.\n{_OPTS}"
