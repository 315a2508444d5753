"""Encoders on locally provided pretrained weights (nothing is ever downloaded).

* ``bert_text`` — a BERT-style text model through ``transformers``, from a folder saved with
  ``model.save_pretrained(DIR)`` and ``tokenizer.save_pretrained(DIR)``
  (``--model.encoders.text.path DIR``; loaded with ``local_files_only=True``).
* ``resnet_image`` — a torchvision ResNet (18/34/50/101/152) from a state dict file such as
  ``resnet50-0676ba61.pth`` (``--model.encoders.image.weights FILE``).
* ``clip_image`` / ``clip_text`` — a CLIP tower through ``open_clip`` from a local checkpoint
  (``--model.encoders.image.checkpoint FILE --model.encoders.image.arch ViT-B-32``).

Inputs follow :mod:`mmbalance.data.imagetext`: text arrives as UTF-8 byte codes ``(B, L)`` and
is tokenised here, with the tokenizer that belongs to the weights (so one folder fixes both,
and an absent text, all zeros, is the empty string); images arrive as pixels in ``[0, 1]``
``(B, 3, H, W)`` and are normalised here with the weights' statistics (ImageNet for torchvision
ResNets, CLIP's for CLIP; ``mean``/``std`` override them).

``freeze=True`` keeps the pretrained network in eval mode under ``no_grad`` and *outside* the
module tree: its weights are not parameters (the optimizer, gradient averaging, clipping and
methods that toggle ``requires_grad`` never see them) and not in ``state_dict()`` (a checkpoint
does not carry hundreds of MB of unchanged weights; a saved run rebuilds them from the same
local files). Copies of the encoder (``copy.deepcopy``) share the frozen network. With
``freeze=False`` (the papers' fine-tuning) it is an ordinary submodule.
"""
from __future__ import annotations

import contextlib
import copy
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..data.imagetext import codes_to_text
from ..options import Interval
from ..registry import ConfigError
from .encoders import register_encoder
from .resnet import weight_init

__all__ = ["PretrainedEncoder", "BertTextEncoder", "ResNetImageEncoder", "ResNetTrunk", "ClipImageEncoder",
           "ClipTextEncoder", "load_resnet_state", "IMAGENET_MEAN", "IMAGENET_STD", "CLIP_MEAN", "CLIP_STD",
           "RESNET_LAYERS", "pool_grid"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RESNET_LAYERS = {"resnet18": ("basic", (2, 2, 2, 2)), "resnet34": ("basic", (3, 4, 6, 3)),
                 "resnet50": ("bottleneck", (3, 4, 6, 3)), "resnet101": ("bottleneck", (3, 4, 23, 3)),
                 "resnet152": ("bottleneck", (3, 8, 36, 3))}
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")

PosInt = Annotated[int, Interval(1, None)]


class PretrainedEncoder(nn.Module):
    """Base: holds the pretrained network ``net``, frozen (hidden, eval, no grad) or fine-tuned."""

    out_dim: int

    def _set_net(self, net: nn.Module, freeze: bool) -> None:
        self.freeze = bool(freeze)
        if self.freeze:
            net.eval()
            net.requires_grad_(False)
            object.__setattr__(self, "_frozen", net)  # not registered: no parameters, no state_dict entries
        else:
            self.backbone = net

    @property
    def net(self) -> nn.Module:
        return self.__dict__["_frozen"] if self.freeze else self.backbone

    def _apply(self, fn, recurse: bool = True):  # .to(device), .float(), ... reach the frozen net too
        super()._apply(fn, recurse)
        frozen = self.__dict__.get("_frozen")
        if frozen is not None:
            frozen._apply(fn)
        return self

    def __deepcopy__(self, memo: dict) -> "PretrainedEncoder":
        for shared in (self.__dict__.get("_frozen"), self.__dict__.get("tokenizer")):
            if shared is not None:
                memo[id(shared)] = shared  # never changes: shared, not copied
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    def run(self, fn, *args: Any, **kwargs: Any):
        """Call ``fn`` (which uses ``self.net``) without autograd when frozen."""
        ctx = torch.no_grad() if self.freeze else contextlib.nullcontext()
        with ctx:
            return fn(*args, **kwargs)


def _normaliser(mean: list[float] | None, std: list[float] | None, default_mean, default_std, name: str):
    mean = list(default_mean if mean is None else mean)
    std = list(default_std if std is None else std)
    if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
        raise ConfigError(f"encoder '{name}' options mean and std take 3 numbers each (std > 0), got {mean} / {std}")
    return torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)


def _check_image_input(name: str, input_shape: tuple) -> None:
    if len(input_shape) != 3 or int(input_shape[0]) != 3:
        raise ConfigError(f"encoder '{name}' takes RGB images (3, H, W) per sample, got shape {tuple(input_shape)}")


def _check_text_input(name: str, input_shape: tuple) -> None:
    if len(input_shape) != 1:
        raise ConfigError(f"encoder '{name}' takes text as a 1-D buffer of UTF-8 byte codes per sample (an image-text "
                          f"dataset's text modality), got shape {tuple(input_shape)}")


# ----------------------------------------------------------------------------- transformers text
@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' load-time chatter (unused weights of a pretraining head, ...)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _check_model_folder(path: str | None, name: str) -> Path:
    expected = ("a folder saved with model.save_pretrained(DIR) and tokenizer.save_pretrained(DIR): config.json, "
                "model.safetensors (or pytorch_model.bin) and the tokenizer files")
    if not path:
        raise ConfigError(f"encoder '{name}' needs option path (--model.encoders.text.path DIR): {expected}; "
                          "nothing is downloaded")
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ConfigError(f"encoder '{name}': path {path} is not a folder; expected {expected}")
    if not (p / "config.json").is_file():
        raise ConfigError(f"encoder '{name}': {path} lacks config.json; expected {expected}")
    if not any((p / f).is_file() for f in WEIGHT_FILES):
        raise ConfigError(f"encoder '{name}': {path} lacks the weights file model.safetensors (or pytorch_model.bin); "
                          f"expected {expected}")
    return p


def _one_line(e: BaseException, limit: int = 160) -> str:
    text = str(e).strip().splitlines()
    line = f"{type(e).__name__}: {text[0]}" if text else type(e).__name__
    return line if len(line) <= limit else line[: limit - 3].rstrip() + "..."


class BertTextEncoder(PretrainedEncoder):
    """A transformers encoder-only text model over UTF-8 byte codes ``(B, L)`` -> ``(B, hidden)``."""

    def __init__(self, path: str | None, pooling: str = "cls", max_length: int = 512, freeze: bool = False):
        super().__init__()
        p = _check_model_folder(path, "bert_text")
        # tokenising happens in the training process, which forks DataLoader workers afterwards: the
        # Rust tokenizer's thread pool would warn (and could deadlock) in every fork
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from transformers import AutoModel, AutoTokenizer

        no_tok = (f"encoder 'bert_text': {path} has no usable tokenizer (tokenizer.json, vocab.txt, vocab.json or a "
                  "sentencepiece model); save it with tokenizer.save_pretrained(DIR)")
        if not any((p / f).is_file() for f in TOKENIZER_FILES):
            raise ConfigError(no_tok)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
        except Exception as e:  # noqa: BLE001 - any failure is a missing or broken tokenizer
            raise ConfigError(f"{no_tok} ({_one_line(e)})") from None
        if len(tokenizer) <= len(set(tokenizer.all_special_tokens)):  # recent transformers build an empty one
            raise ConfigError(f"{no_tok} (its vocabulary holds special tokens only)")
        try:
            with _quiet_transformers():
                model, info = AutoModel.from_pretrained(str(p), local_files_only=True, output_loading_info=True)
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"encoder 'bert_text': cannot load the model in {path} ({_one_line(e)})") from None
        if pooling == "pooler":
            if getattr(model, "pooler", None) is None:
                raise ConfigError(f"encoder 'bert_text': the model in {path} has no pooler; use pooling cls or mean")
            if any("pooler" in k for k in info.get("missing_keys", [])):
                raise ConfigError(f"encoder 'bert_text': {path} holds no trained pooler weights; use pooling cls or mean")
        self.tokenizer = tokenizer
        self.pooling = pooling
        limits = [int(max_length), int(getattr(model.config, "max_position_embeddings", max_length) or max_length)]
        if isinstance(getattr(tokenizer, "model_max_length", None), int) and tokenizer.model_max_length > 0:
            limits.append(int(tokenizer.model_max_length))
        self.max_length = min(limits)
        self.out_dim = int(model.config.hidden_size)
        self.mixable = False  # byte codes: interpolating two inputs is meaningless (no input mixup)
        self._set_net(model, freeze)

    def tokenize(self, codes: torch.Tensor) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(codes_to_text(codes), padding="longest", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return {"input_ids": enc["input_ids"].to(codes.device), "attention_mask": enc["attention_mask"].to(codes.device)}

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        tok = self.tokenize(codes)

        def encode() -> torch.Tensor:
            out = self.net(**tok)
            if self.pooling == "pooler":
                return out.pooler_output
            h = out.last_hidden_state
            if self.pooling == "cls":
                return h[:, 0]
            mask = tok["attention_mask"].unsqueeze(-1).to(h.dtype)
            return (h * mask).sum(1) / mask.sum(1).clamp_min(1.0)

        return self.run(encode)


@register_encoder("bert_text", summary="BERT-style transformers text encoder from a local folder (model + tokenizer); options path, pooling, max_length, freeze")
def bert_text(input_shape: tuple, path: str | None = None, pooling: Literal["cls", "pooler", "mean"] = "cls",
              max_length: PosInt = 512, freeze: bool = False) -> nn.Module:
    """Text encoder through transformers (AutoModel + AutoTokenizer, local files only).

    Options:
        path: folder with the saved model and tokenizer (save_pretrained); nothing is downloaded.
        pooling: cls (the [CLS] hidden state, the MIE code's models/TextImage.py), pooler (BERT's pooler output, QMF/MMBT) or mean (masked mean).
        max_length: maximum tokens per text (longer texts are truncated; also capped by the model).
        freeze: keep the model frozen (eval mode, no gradients, not in checkpoints); false = fine-tune as the papers do.
    """
    _check_text_input("bert_text", input_shape)
    return BertTextEncoder(path, pooling, max_length, freeze)


# ----------------------------------------------------------------------------- torchvision ResNet
def pool_grid(regions: int) -> tuple[int, int]:
    """Adaptive-pool grid giving ``regions`` image embeddings (MMBT's ``ImageEncoder`` table).

    >>> [pool_grid(k) for k in (1, 3, 4, 9)]
    [(1, 1), (3, 1), (2, 2), (3, 3)]
    """
    return {1: (1, 1), 2: (2, 1), 3: (3, 1), 4: (2, 2), 5: (5, 1), 6: (3, 2), 7: (7, 1), 8: (4, 2), 9: (3, 3)}[regions]


class ResNetTrunk(nn.Module):
    """A torchvision ResNet with module names as torchvision's (``conv1`` ... ``layer4``, ``fc``),
    so torchvision state dicts load at ``width=64``; smaller widths scale every stage (tests)."""

    def __init__(self, arch: str = "resnet50", width: int = 64, fc_classes: int | None = None):
        super().__init__()
        from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1

        kind, layers = RESNET_LAYERS[arch]
        block = BasicBlock if kind == "basic" else Bottleneck
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        def make(planes: int, blocks: int, stride: int) -> nn.Sequential:
            down = None
            if stride != 1 or self.inplanes != planes * block.expansion:
                down = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                     nn.BatchNorm2d(planes * block.expansion))
            mods = [block(self.inplanes, planes, stride, down)]
            self.inplanes = planes * block.expansion
            mods += [block(self.inplanes, planes) for _ in range(1, blocks)]
            return nn.Sequential(*mods)

        self.layer1 = make(width, layers[0], 1)
        self.layer2 = make(2 * width, layers[1], 2)
        self.layer3 = make(4 * width, layers[2], 2)
        self.layer4 = make(8 * width, layers[3], 2)
        self.out_channels = 8 * width * block.expansion
        self.fc = nn.Linear(self.out_channels, fc_classes) if fc_classes else None
        self.apply(weight_init)  # torchvision's conv/BN initialisation (used only from scratch)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def load_resnet_state(trunk: ResNetTrunk, path: str, arch: str, width: int) -> None:
    """Load a torchvision state dict file into ``trunk``; one-line ``ConfigError`` when missing or
    incompatible. Accepts a plain state dict or one under ``state_dict``/``model``, strips
    ``module.``; ``fc.*`` is ignored unless the trunk keeps torchvision's classifier."""
    if not os.path.isfile(path):
        raise ConfigError(f"encoder 'resnet_image': weights file not found: {path} (expected a torchvision {arch} "
                          f"state dict, e.g. {arch}-*.pth from download.pytorch.org/models, saved locally)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is a user error
        raise ConfigError(f"encoder 'resnet_image': cannot read weights {path} ({_one_line(e)})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state:
        raise ConfigError(f"encoder 'resnet_image': {path} holds no state dict")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    if trunk.fc is None:
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    own = trunk.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(getattr(state[k], "shape", ())) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = [f"{len(v)} {what} (first {v[0]})" for v, what in ((missing, "missing keys"),
                                                                 (unexpected, "unexpected keys"),
                                                                 (shapes, "shape mismatches")) if v]
        raise ConfigError(f"encoder 'resnet_image': weights {path} do not fit {arch} width {width}: "
                          f"{'; '.join(parts)}; check arch and width")
    trunk.load_state_dict(state, strict=True)


class ResNetImageEncoder(PretrainedEncoder):
    """torchvision ResNet over pixels in [0, 1] ``(B, 3, H, W)``: normalise, trunk, then average
    pooling to ``pool_regions`` embeddings (concatenated) or torchvision's ImageNet classifier."""

    def __init__(self, arch: str = "resnet50", weights: str | None = None, width: int = 64, head: str = "pool",
                 pool_regions: int = 1, freeze: bool = False, mean: list[float] | None = None,
                 std: list[float] | None = None, fc_classes: int = 1000):
        super().__init__()
        trunk = ResNetTrunk(arch, width, fc_classes if head == "fc" else None)
        if weights:
            load_resnet_state(trunk, weights, arch, width)
        m, s = _normaliser(mean, std, IMAGENET_MEAN, IMAGENET_STD, "resnet_image")
        self.register_buffer("mean", m, persistent=False)
        self.register_buffer("std", s, persistent=False)
        self.head = head
        self.grid = pool_grid(pool_regions)
        self.out_dim = int(trunk.fc.out_features) if head == "fc" else trunk.out_channels * pool_regions
        self._set_net(trunk, freeze)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

        def encode() -> torch.Tensor:
            maps = self.net.features(x)
            if self.head == "fc":
                return self.net.fc(torch.flatten(F.adaptive_avg_pool2d(maps, 1), 1))
            return torch.flatten(F.adaptive_avg_pool2d(maps, self.grid), 1)  # (B, C * regions)

        return self.run(encode)


@register_encoder("resnet_image", summary="torchvision ResNet-18..152 image encoder from a local state dict file; options arch, weights, head, pool_regions, freeze")
def resnet_image(input_shape: tuple, arch: Literal["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"] = "resnet50",
                 weights: str | None = None, from_scratch: bool = False, width: PosInt = 64,
                 head: Literal["pool", "fc"] = "pool", pool_regions: Annotated[int, Interval(1, 9)] = 1,
                 freeze: bool = False, mean: list[float] | None = None, std: list[float] | None = None) -> nn.Module:
    """ResNet image encoder (torchvision architecture and state dicts; nothing is downloaded).

    Options:
        arch: the torchvision ResNet (resnet50 in the MIE code; QMF/MMBT use resnet152).
        weights: local torchvision state dict file of that arch, e.g. resnet50-0676ba61.pth.
        from_scratch: allow no weights (random initialisation); weights are required otherwise.
        width: base width (64 = torchvision's; smaller widths scale every stage, for tests).
        head: pool (global average pool of layer4: 2048-d for ResNet-50) or fc (torchvision's ImageNet classifier kept: 1000-d logits as features, the MIE code's models/TextImage.py).
        pool_regions: number of pooled image embeddings, concatenated (QMF/MMBT's num_image_embeds 3); 1 = global pool.
        freeze: keep the trunk frozen (eval mode, no gradients, not in checkpoints); false = fine-tune as the papers do.
        mean: per-channel normalisation mean (default ImageNet's; the MIE code uses CLIP's).
        std: per-channel normalisation std (default ImageNet's).
    """
    _check_image_input("resnet_image", input_shape)
    if weights and from_scratch:
        raise ConfigError("encoder 'resnet_image': give either weights or from_scratch true, not both")
    if not weights and not from_scratch:
        raise ConfigError(f"encoder 'resnet_image' needs option weights (--model.encoders.image.weights FILE): a local "
                          f"torchvision {arch} state dict such as {arch}-*.pth; or set from_scratch true")
    if head == "fc" and pool_regions != 1:
        raise ConfigError("encoder 'resnet_image': head fc takes the global pool; pool_regions must be 1")
    return ResNetImageEncoder(arch, weights, width, head, pool_regions, freeze, mean, std)


# ----------------------------------------------------------------------------- open_clip CLIP
def _open_clip_model(name: str, arch: str, checkpoint: str | None, config: str | None) -> nn.Module:
    if arch.startswith("hf-hub:"):
        raise ConfigError(f"encoder '{name}': arch {arch} would download from the Hugging Face hub; give an open_clip "
                          "architecture name and a local checkpoint file")
    import open_clip

    if config:
        if not os.path.isfile(config):
            raise ConfigError(f"encoder '{name}': model config file not found: {config} (an open_clip JSON model config)")
        open_clip.add_model_config(config)
        arch = arch or Path(config).stem
    if not arch.startswith("local-dir:"):
        if not checkpoint:
            raise ConfigError(f"encoder '{name}' needs option checkpoint: a local open_clip checkpoint file of {arch} "
                              f"(e.g. open_clip_pytorch_model.bin); nothing is downloaded")
        if not os.path.isfile(checkpoint):
            raise ConfigError(f"encoder '{name}': checkpoint file not found: {checkpoint} (a local open_clip checkpoint "
                              f"of {arch})")
        if arch not in open_clip.list_models():
            raise ConfigError(f"encoder '{name}': unknown open_clip arch {arch!r}; give one of open_clip.list_models() "
                              "or a JSON model config with option config")
    try:
        return open_clip.create_model(arch, pretrained=None if arch.startswith("local-dir:") else checkpoint,
                                      pretrained_image=False, pretrained_text=False, require_pretrained=True)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"encoder '{name}': cannot build {arch} from {checkpoint} ({_one_line(e)})") from None


class ClipImageEncoder(PretrainedEncoder):
    """The image tower of a CLIP model (projected embedding) over pixels in [0, 1]."""

    def __init__(self, arch: str, checkpoint: str | None, config: str | None, freeze: bool, image_size: int,
                 mean: list[float] | None = None, std: list[float] | None = None):
        super().__init__()
        model = _open_clip_model("clip_image", arch, checkpoint, config)
        visual = model.visual
        want = getattr(visual, "image_size", None)
        want = tuple(want) if isinstance(want, (tuple, list)) else (want, want) if want else None
        if want and want != (image_size, image_size):
            raise ConfigError(f"encoder 'clip_image': {arch} takes {want[0]}x{want[1]} images but the dataset gives "
                              f"{image_size}x{image_size}; set --dataset.image_size {want[0]}")
        m, s = _normaliser(mean, std, CLIP_MEAN, CLIP_STD, "clip_image")
        self.register_buffer("mean", m, persistent=False)
        self.register_buffer("std", s, persistent=False)
        self.out_dim = int(getattr(visual, "output_dim", 0) or model.text_projection.shape[1])
        self._set_net(visual, freeze)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        return self.run(lambda: self.net(x))


class ClipTextEncoder(PretrainedEncoder):
    """The text tower of a CLIP model (projected embedding) over UTF-8 byte codes."""

    def __init__(self, arch: str, checkpoint: str | None, config: str | None, freeze: bool):
        super().__init__()
        import open_clip

        model = _open_clip_model("clip_text", arch, checkpoint, config)
        try:
            self.tokenizer = open_clip.get_tokenizer(arch)
        except Exception as e:  # noqa: BLE001 - e.g. a hub tokenizer that is not available offline
            raise ConfigError(f"encoder 'clip_text': no local tokenizer for {arch} ({_one_line(e)})") from None
        model.visual = nn.Identity()  # the image tower is not needed here
        with torch.no_grad():
            probe = model.encode_text(self.tokenizer([""]))
        self.out_dim = int(probe.shape[-1])
        self.mixable = False
        self._set_net(model, freeze)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        tokens = self.tokenizer(codes_to_text(codes)).to(codes.device)
        return self.run(lambda: self.net.encode_text(tokens))


@register_encoder("clip_image", summary="CLIP image tower through open_clip from a local checkpoint; options arch, checkpoint, freeze")
def clip_image(input_shape: tuple, arch: str = "ViT-B-32", checkpoint: str | None = None, config: str | None = None,
               freeze: bool = False, mean: list[float] | None = None, std: list[float] | None = None) -> nn.Module:
    """CLIP image encoder (open_clip; local checkpoint only).

    Options:
        arch: open_clip architecture name (open_clip.list_models()), or local-dir:FOLDER with open_clip_config.json and weights.
        checkpoint: local open_clip checkpoint file of that arch (e.g. open_clip_pytorch_model.bin).
        config: optional JSON model config registered with open_clip (an architecture it does not list).
        freeze: keep the tower frozen (eval mode, no gradients, not in checkpoints); false = fine-tune.
        mean: per-channel normalisation mean (default CLIP's).
        std: per-channel normalisation std (default CLIP's).
    """
    _check_image_input("clip_image", input_shape)
    return ClipImageEncoder(arch, checkpoint, config, freeze, int(input_shape[-1]), mean, std)


@register_encoder("clip_text", summary="CLIP text tower through open_clip from a local checkpoint; options arch, checkpoint, freeze")
def clip_text(input_shape: tuple, arch: str = "ViT-B-32", checkpoint: str | None = None, config: str | None = None,
              freeze: bool = False) -> nn.Module:
    """CLIP text encoder (open_clip's own BPE tokenizer; local checkpoint only).

    Options:
        arch: open_clip architecture name (open_clip.list_models()), or local-dir:FOLDER.
        checkpoint: local open_clip checkpoint file of that arch.
        config: optional JSON model config registered with open_clip.
        freeze: keep the tower frozen (eval mode, no gradients, not in checkpoints); false = fine-tune.
    """
    _check_text_input("clip_text", input_shape)
    return ClipTextEncoder(arch, checkpoint, config, freeze)
