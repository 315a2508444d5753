"""ResNet-18 encoders for audio spectrograms and video frames (the OGM-GE lineage backbone).

Both encoders are the torchvision ResNet-18 trunk — ``conv1`` 7x7/2, BN, ReLU, 3x3/2 max-pool,
four stages of two :class:`torchvision.models.resnet.BasicBlock` each — with no ``avgpool``
and no ``fc``; the pooling is done here, as in the field's code (OGM-GE ``models/backbone.py``,
``basic_model.py``):

* ``resnet18_audio``: input ``(B, C, F, T)`` (C = 1: a spectrogram), trunk, global average
  pool -> ``(B, 8 * width)``.
* ``resnet18_visual``: input ``(B, 3, T, H, W)`` (channels, frames, height, width). Every frame
  goes through the same 2D trunk; the maps are mean-pooled over time and space (the field's
  ``adaptive_avg_pool3d``) -> ``(B, 8 * width)``. A single image ``(B, 3, H, W)`` is accepted too.

``width`` is the base channel width: 64 is the real ResNet-18 (stage widths 64/128/256/512,
``out_dim`` 512, 11.2 M parameters for 3 input channels). Smaller widths scale every stage
(``width=16`` gives 16/32/64/128, ``out_dim`` 128, about 0.7 M parameters) so CPU runs are
feasible; the bundled ``av_digits`` dataset asks for ``width=16`` by default.

Initialisation follows the field's ``weight_init`` (applied to every module, overriding
torchvision's own BN init): Conv2d ``kaiming_normal_(mode="fan_out", nonlinearity="relu")``,
BatchNorm weight 1 and bias 0, Linear ``xavier_normal_`` with zero bias. Training is from
scratch by default; ``weights`` loads a state dict from a local file (never downloaded).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, conv1x1

from ..options import Annotated, Interval
from ..registry import ConfigError
from .encoders import register_encoder

__all__ = ["ResNet18Trunk", "ResNet18Audio", "ResNet18Visual", "weight_init", "load_weights"]


def weight_init(module: nn.Module) -> None:
    """The field's initialisation for one module (use with ``model.apply(weight_init)``)."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_normal_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d, nn.GroupNorm)):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class ResNet18Trunk(nn.Module):
    """torchvision's ResNet-18 without ``avgpool``/``fc``: returns the layer4 feature map.

    Module names match torchvision's (``conv1``, ``bn1``, ``layer1`` ... ``layer4``), so a
    torchvision ``resnet18`` state dict loads into ``width=64`` directly.
    """

    def __init__(self, in_channels: int = 3, width: int = 64):
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(width, 2, stride=1)
        self.layer2 = self._make_layer(2 * width, 2, stride=2)
        self.layer3 = self._make_layer(4 * width, 2, stride=2)
        self.layer4 = self._make_layer(8 * width, 2, stride=2)
        self.out_channels = 8 * width

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes, stride), nn.BatchNorm2d(planes))
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def load_weights(trunk: nn.Module, path: str) -> None:
    """Load a local state dict into a trunk; one-line ``ConfigError`` when missing or incompatible.

    Accepts a plain state dict or a checkpoint holding one under ``state_dict``/``model``;
    strips a ``module.`` prefix (DataParallel), ignores torchvision's ``fc.*`` keys, and, for a
    1-channel trunk given 3-channel ``conv1`` weights (ImageNet), averages them over channels.
    """
    if not os.path.isfile(path):
        raise ConfigError(f"encoder weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is a user error
        raise ConfigError(f"cannot read encoder weights {path}: {type(e).__name__}: {e}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ConfigError(f"encoder weights {path} hold no state dict")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    w = state.get("conv1.weight")
    own = trunk.conv1.weight  # type: ignore[attr-defined]
    if isinstance(w, torch.Tensor) and w.dim() == 4 and w.shape[1] != own.shape[1] and own.shape[1] == 1:
        state["conv1.weight"] = w.mean(dim=1, keepdim=True)
    try:
        trunk.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise ConfigError(f"encoder weights {path} do not fit this ResNet-18 (check width/in_channels): {first}") from None


class _ResNet18Encoder(nn.Module):
    """A ResNet-18 trunk with the field's initialisation and optional local weights."""

    def __init__(self, in_channels: int, width: int = 64, weights: str | None = None):
        super().__init__()
        self.trunk = ResNet18Trunk(in_channels, width)
        self.apply(weight_init)
        if weights:
            load_weights(self.trunk, weights)
        self.out_dim = self.trunk.out_channels


class ResNet18Audio(_ResNet18Encoder):
    """ResNet-18 over a spectrogram ``(B, C, F, T)``, global average pooled to ``(B, out_dim)``."""

    def __init__(self, in_channels: int = 1, width: int = 64, weights: str | None = None):
        super().__init__(in_channels, width, weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(self.trunk(x), 1), 1)


class ResNet18Visual(_ResNet18Encoder):
    """2D ResNet-18 on each frame of ``(B, C, T, H, W)``, mean-pooled over time and space."""

    def __init__(self, in_channels: int = 3, width: int = 64, weights: str | None = None):
        super().__init__(in_channels, width, weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:  # a single image per sample
            x = x.unsqueeze(2)
        b, c, t, h, w = x.shape
        frames = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        maps = self.trunk(frames)  # (B*T, C', h', w')
        maps = maps.reshape(b, t, *maps.shape[1:])
        return maps.mean(dim=(1, 3, 4))


def _check_input(name: str, input_shape: tuple, in_channels: int, ndims: tuple[int, ...]) -> None:
    if len(input_shape) not in ndims:
        want = " or ".join(f"{n}-d" for n in ndims)
        raise ConfigError(f"encoder '{name}' expects a {want} input per sample, got shape {tuple(input_shape)}")
    if input_shape[0] != in_channels:
        raise ConfigError(f"encoder '{name}' has in_channels={in_channels} but the input has "
                          f"{input_shape[0]} channels (shape {tuple(input_shape)}); set in_channels")


PositiveInt = Annotated[int, Interval(1, None)]


@register_encoder("resnet18_audio", summary="ResNet-18 over a 1-channel spectrogram (1, F, T), avg-pooled; options width, weights")
def resnet18_audio(input_shape: tuple, in_channels: PositiveInt | None = None, width: PositiveInt = 64,
                   weights: str | None = None) -> nn.Module:
    """ResNet-18 audio encoder; ``out_dim = 8 * width`` (512 for the real ResNet-18).

    Options:
        in_channels: input channels (default None = the input's first axis, 1 for a spectrogram).
        width: channels of the first stage, doubled per stage (default 64, the real ResNet-18).
        weights: a local state-dict file to load into the trunk (default None = random initialisation).
    """
    in_channels = int(input_shape[0]) if in_channels is None and len(input_shape) == 3 else (in_channels or 1)
    _check_input("resnet18_audio", input_shape, in_channels, (3,))
    return ResNet18Audio(in_channels, int(width), weights)


@register_encoder("resnet18_visual", summary="2D ResNet-18 per frame of (3, T, H, W), mean-pooled over time and space; options width, weights")
def resnet18_visual(input_shape: tuple, in_channels: PositiveInt | None = None, width: PositiveInt = 64,
                    weights: str | None = None) -> nn.Module:
    """ResNet-18 visual encoder over T frames; ``out_dim = 8 * width`` (512 for the real ResNet-18).

    Options:
        in_channels: input channels (default None = the input's first axis, 3 for RGB frames).
        width: channels of the first stage, doubled per stage (default 64, the real ResNet-18).
        weights: a local state-dict file to load into the trunk (default None = random initialisation).
    """
    in_channels = int(input_shape[0]) if in_channels is None and len(input_shape) in (3, 4) else (in_channels or 3)
    _check_input("resnet18_visual", input_shape, in_channels, (3, 4))
    return ResNet18Visual(in_channels, int(width), weights)
