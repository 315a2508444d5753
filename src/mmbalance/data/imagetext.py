"""Image-text datasets read in their published layouts: ``twitter2015``, ``twitter2017``, ``sarcasm``,
``food101`` (UPMC Food-101) and ``mvsa`` (MVSA-Single / MVSA-Multiple).

Two modalities, ``image`` and ``text``. What a sample carries (the batch contract needs tensors
that stack, so nothing here depends on a tokenizer or on an encoder's normalisation):

* ``image``: ``(3, S, S)`` float pixels in ``[0, 1]`` (``S = image_size``), after the layout's
  transforms; the encoder normalises (ImageNet statistics for ResNets, CLIP's for CLIP).
* ``text``: ``(text_bytes,)`` float tensor of the text's UTF-8 byte codes, zero-padded
  (:func:`text_to_codes`; truncated at a character boundary). The text encoder decodes it
  (:func:`codes_to_text`) and tokenises with the tokenizer saved next to its weights, so one
  folder (``--model.encoders.text.path``) fixes both, any tokenizer works (BERT WordPiece, CLIP
  BPE) and an absent text (zeros) is the empty string.

Missing image files are marked absent (``present`` False, zeros) with a warning, or are an
error with ``missing_images: error``. Without a validation list, ``val_fraction`` of train is
held out (stratified, fixed seed): model selection never looks at the test split. ``train_eval``
is the training split with evaluation transforms (probes, feature extraction).

Layouts (``root`` is the dataset's folder; the first layout found is used, ``info['layout']``
says which):

``twitter2015`` / ``twitter2017`` (3 classes: negative, neutral, positive)
    *TomBERT release* (Yu & Jiang, IJCAI 2019): ``root/twitter2015/{train,dev,test}.tsv`` with
    the header ``index  #1 Label  #2 ImageID  #3 String  #3 String`` (the first string holds the
    tweet with ``$T$`` for the target, the second the target, substituted back) and
    ``root/twitter2015_images/<ImageID>``. *MIE code* (``njustkmg/IJCAI25-IGM``,
    ``datasets/twitter_dataset.py``, ``configs/twitter.json``): ``root/annotations/{train,test}.tsv``
    with columns ``Label``, ``String``, ``ImageID`` and ``root/twitter2015_images/``.
``sarcasm`` (2 classes: non-sarcastic, sarcastic)
    *Original release* (Cai et al., ACL 2019, ``headacheboy/data-of-multimodal-sarcasm-detection``):
    ``root/text/{train.txt,valid2.txt,test2.txt}``, one Python list per line
    ``['<id>', '<text>', ..., label]`` (the last element is the label), images
    ``root/dataset_image/<id>.jpg``; by default the original code's keyword filter drops samples
    whose text contains sarcasm, sarcastic, reposting, <url>, joke(s), humo(u)r, irony, ironic or
    exgag (``codes/loadData.py``). *MIE code* (``datasets/sarcasm_dataset.py``):
    ``root/annotations/{train,test}_data.json`` (lists of ``{"image", "text", "label"}``) and
    ``root/images/``.
``food101`` (101 classes)
    *QMF / MMBT layout* (``QingyangZhang/QMF`` ``text-image-classification/src/data``,
    ``facebookresearch/mmbt`` ``scripts/food_101.py``): ``root/{train,dev,test}.jsonl`` with
    ``{"text", "img", "label"}`` per line, ``img`` relative to ``root``. *UPMC release*:
    ``root/images/{train,test}/<class>/<class>_<n>.jpg`` and ``root/texts_txt/<class>/<class>_<n>.txt``
    (an image without a text is dropped and the text is lowercased with punctuation removed,
    as MMBT's conversion does).
``mvsa`` (3 classes)
    *QMF layout*: ``root/{train,dev,test}.jsonl`` and ``root/data/<id>.jpg``. *MVSA release*:
    ``root/labelResultAll.txt`` (``ID<TAB>text,image``: one annotation column for MVSA-Single,
    three for MVSA-Multiple) and ``root/data/<id>.{jpg,txt}``. Labels follow the usual rule
    (Xu & Mao 2017): per modality the majority of the annotators (no majority: dropped); text
    and image labels equal -> that label, one neutral -> the other, positive vs negative ->
    dropped. The release has no split: a fixed stratified 80/10/10 split.
"""
from __future__ import annotations

import ast
import csv
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..options import Interval
from ..registry import ConfigError
from . import register_dataset
from .base import DataSplits, stratified_split

__all__ = ["MODALITIES", "ImageTextDataset", "Sample", "text_to_codes", "codes_to_text", "english_words",
           "clean_caption", "mmbt_clean", "mvsa_majority", "mvsa_combine", "image_transform",
           "twitter2015", "twitter2017", "sarcasm", "food101", "mvsa"]

log = logging.getLogger("mmbalance")
MODALITIES = ("image", "text")
SPLITS = ("train", "val", "test")
SPLIT_SEED = 0
SENTIMENT = ["negative", "neutral", "positive"]
SARCASM = ["non-sarcastic", "sarcastic"]
SARCASM_KEYWORDS = ("sarcasm", "sarcastic", "reposting", "<url>", "joke", "humour", "humor", "jokes", "irony",
                    "ironic", "exgag")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")

PosInt = Annotated[int, Interval(1, None)]
Fraction = Annotated[float, Interval(0, 1, closed="neither")]
Modalities = list[Literal["image", "text"]] | None
Augment = Literal["none", "crop_flip", "randaugment"]
Resize = Literal["center_crop", "square"]


# ----------------------------------------------------------------------------- text transport
def text_to_codes(text: str, length: int) -> torch.Tensor:
    """The UTF-8 bytes of ``text`` as a ``(length,)`` float tensor, zero-padded; longer texts are
    cut at a character boundary (NUL characters, the padding code, are dropped).

    >>> text_to_codes("hé", 5).tolist()
    [104.0, 195.0, 169.0, 0.0, 0.0]
    >>> codes_to_text(text_to_codes("héllo", 2).unsqueeze(0))   # 'é' does not fit whole
    ['h']
    """
    raw = text.replace("\x00", "").encode("utf-8")[:length]
    raw = raw.decode("utf-8", "ignore").encode("utf-8")
    out = torch.zeros(length, dtype=torch.float32)
    if raw:
        out[: len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8).float()
    return out


def codes_to_text(codes: torch.Tensor) -> list[str]:
    """Decode a batch ``(B, L)`` of :func:`text_to_codes` rows back to strings (zeros are
    padding; values are rounded and clamped to bytes, so any float input decodes)."""
    b = codes.detach().reshape(codes.shape[0], -1).float().round().clamp(0, 255).to(torch.uint8).cpu().numpy()
    return [bytes(row[row > 0]).decode("utf-8", "ignore") for row in b]


# ----------------------------------------------------------------------------- text cleaning
_CAPTION_DROP = re.compile(r"([,.'!?\"()*#:;~])")


def english_words(text: str) -> str:
    """Only the runs of ASCII letters, space-separated (the MIE code's Twitter ``clean_str``).

    >>> english_words("RT @ user : $T$ is #1 , café!")
    'RT user T is'
    """
    return " ".join(re.findall(r"\b[A-Za-z]+\b", text))


def clean_caption(text: str, max_words: int | None = None) -> str:
    """Lowercase, drop ``,.'!?"()*#:;~``, ``-`` and ``/`` to spaces, ``<person>`` to ``person``,
    collapse spaces, keep the first ``max_words`` words (the MIE code's ``pre_caption``).

    >>> clean_caption("Hello, World!  it's  a well-known <person>/thing", 5)
    'hello world its a well'
    """
    s = _CAPTION_DROP.sub("", text.lower()).replace("-", " ").replace("/", " ").replace("<person>", "person")
    s = re.sub(r"\s{2,}", " ", s).strip()
    if max_words is not None:
        s = " ".join(s.split(" ")[:max_words])
    return s


def mmbt_clean(text: str) -> str:
    """MMBT's formatting of a UPMC Food-101 text: punctuation and symbols to spaces, spaces
    collapsed, lowercase, one line.

    >>> mmbt_clean("Apple-Pie: the BEST\\n(recipe)!")
    'apple pie the best recipe '
    """
    for c in "<>/\\+=-_[]{}'\";:.,()*&^%$#@!~`":
        text = text.replace(c, " ")
    text = re.sub(r"\s\s+", " ", text)
    return text.lower().replace("\n", " ")


# ----------------------------------------------------------------------------- MVSA labels
def mvsa_majority(votes: Sequence[str]) -> str | None:
    """The label at least half of the annotators gave (one annotator: theirs); None without a
    majority.

    >>> mvsa_majority(["positive", "neutral", "positive"]), mvsa_majority(["positive", "neutral", "negative"])
    ('positive', None)
    """
    votes = [v for v in votes if v]
    for v in dict.fromkeys(votes):
        if 2 * votes.count(v) > len(votes) or len(votes) == 1:
            return v
    return None


def mvsa_combine(text_label: str | None, image_label: str | None) -> str | None:
    """One sentiment per post: equal labels -> it; one neutral -> the other; positive vs
    negative (or a missing label) -> None (the post is dropped).

    >>> [mvsa_combine(*p) for p in [("neutral", "positive"), ("negative", "negative"), ("positive", "negative")]]
    ['positive', 'negative', None]
    """
    if text_label is None or image_label is None:
        return None
    if text_label == image_label:
        return text_label
    if text_label == "neutral":
        return image_label
    if image_label == "neutral":
        return text_label
    return None


# ----------------------------------------------------------------------------- samples and dataset
@dataclass(frozen=True)
class Sample:
    """One post: absolute image path, its text, class index."""

    image: str
    text: str
    label: int


def image_transform(train: bool, image_size: int, augment: str = "none", resize: str = "center_crop"):
    """torchvision transform to ``(3, S, S)`` pixels in [0, 1].

    Evaluation: ``center_crop`` = Resize(S * 256/224) + CenterCrop(S) (QMF/MMBT), ``square`` =
    Resize((S, S)) bicubic (MIE code). Training adds ``augment``: ``crop_flip`` =
    RandomResizedCrop(S, scale 0.5-1, bicubic) + horizontal flip, ``randaugment`` = that +
    RandAugment(2 ops, magnitude 7) (the MIE code's RandomAugment(2, 7) over a slightly smaller
    op set); ``none`` = the evaluation transform (QMF trains without augmentation).
    """
    from torchvision import transforms as T

    bicubic = T.InterpolationMode.BICUBIC
    if train and augment != "none":
        ops: list[Any] = [T.RandomResizedCrop(image_size, scale=(0.5, 1.0), interpolation=bicubic),
                          T.RandomHorizontalFlip()]
        if augment == "randaugment":
            ops.append(T.RandAugment(num_ops=2, magnitude=7))
    elif resize == "square":
        ops = [T.Resize((image_size, image_size), interpolation=bicubic)]
    else:
        ops = [T.Resize(round(image_size * 256 / 224)), T.CenterCrop(image_size)]
    return T.Compose([*ops, T.ToTensor()])


class ImageTextDataset(Dataset):
    """Posts of an image-text dataset; samples follow the batch contract.

    ``present['image']`` is False where the image file was missing when the dataset was built
    (zeros are returned); an image that exists but cannot be decoded is returned as zeros with
    ``present`` False too, and a warning names it once.
    """

    def __init__(self, samples: Sequence[Sample], modalities: Sequence[str], transform: Callable[[Any], torch.Tensor],
                 image_size: int, text_bytes: int, image_present: np.ndarray | None = None):
        self.samples = list(samples)
        self.modalities = list(modalities)
        self.transform = transform
        self.image_size = int(image_size)
        self.text_bytes = int(text_bytes)
        n = len(self.samples)
        self.labels = torch.as_tensor(np.asarray([s.label for s in self.samples], dtype=np.int64))
        img = torch.ones(n, dtype=torch.bool) if image_present is None else torch.as_tensor(image_present, dtype=torch.bool)
        self.present = {m: (img.clone() if m == "image" else torch.ones(n, dtype=torch.bool)) for m in self.modalities}
        self._warned: set[str] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def load_image(self, i: int) -> tuple[torch.Tensor, bool]:
        """The transformed image of sample ``i`` and whether it is present."""
        blank = torch.zeros(3, self.image_size, self.image_size)
        if "image" in self.present and not bool(self.present["image"][i]):
            return blank, False
        from PIL import Image, ImageFile

        path = self.samples[i].image
        old = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = True  # as the MIE code: a cut-off JPEG still decodes
        try:
            with Image.open(path) as im:
                return self.transform(im.convert("RGB")), True
        except (OSError, ValueError, SyntaxError) as e:
            if path not in self._warned:
                self._warned.add(path)
                log.warning("cannot read image %s (%s: %s); treated as absent", path, type(e).__name__, e)
            return blank, False
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = old

    def __getitem__(self, i: int) -> dict[str, Any]:
        inputs: dict[str, torch.Tensor] = {}
        present: dict[str, torch.Tensor] = {}
        for m in self.modalities:
            if m == "image":
                x, ok = self.load_image(i)
            else:
                x, ok = text_to_codes(self.samples[i].text, self.text_bytes), True
            inputs[m], present[m] = x, torch.tensor(ok)
        return {"inputs": inputs, "label": self.labels[i], "index": torch.tensor(i, dtype=torch.long),
                "present": present}


# ----------------------------------------------------------------------------- assembly
def _check_root(name: str, root: str | None, expected: str) -> Path:
    if not root:
        raise ConfigError(f"{name} needs the option root (--dataset.root DIR), the dataset's folder; expected {expected}")
    r = Path(root).expanduser()
    if not r.is_dir():
        raise ConfigError(f"{name} root {root} is not a folder; expected {expected}")
    return r


def _first_dir(*candidates: Path) -> Path | None:
    return next((c for c in candidates if c.is_dir()), None)


def _first_file(folder: Path, *names: str) -> Path | None:
    return next((folder / n for n in names if (folder / n).is_file()), None)


def _carve_val(samples: list[Sample], val_fraction: float) -> tuple[list[Sample], list[Sample]]:
    """Stratified, seeded hold-out of ``val_fraction`` of ``samples`` (at least one when possible)."""
    labels = np.asarray([s.label for s in samples], dtype=np.int64)
    tr, va = stratified_split(labels, [1 - val_fraction, val_fraction], SPLIT_SEED)
    if len(va) == 0 and len(tr) >= 2:
        va, tr = tr[-1:], tr[:-1]
    return [samples[i] for i in tr], [samples[i] for i in va]


def _build(name: str, root: Path, layout: str, splits: dict[str, list[Sample]], class_names: list[str], *,
           modalities: Sequence[str] | None, image_size: int, augment: str, resize: str, text_bytes: int,
           val_fraction: float, missing_images: str, info_name: str | None = None) -> DataSplits:
    """DataSplits from parsed samples (val carved from train when the layout has none)."""
    mods = list(modalities) if modalities else list(MODALITIES)
    if len(set(mods)) != len(mods):
        raise ConfigError(f"{name}: modalities {mods} name one twice")
    splits = dict(splits)
    if not splits.get("val"):
        splits["train"], splits["val"] = _carve_val(splits.get("train", []), val_fraction)
    for s in SPLITS:
        if not splits.get(s):
            raise ConfigError(f"{name}: the {s} split of {root} is empty ({layout} layout); check its files")
    present: dict[str, np.ndarray] = {}
    missing_total = 0
    for s in SPLITS:
        ok = np.fromiter((os.path.isfile(x.image) for x in splits[s]), dtype=bool, count=len(splits[s]))
        if "image" in mods and not ok.all():
            first = splits[s][int(np.flatnonzero(~ok)[0])].image
            if missing_images == "error":
                raise ConfigError(f"{name}: {int((~ok).sum())} image file(s) of the {s} split are missing, first {first}; "
                                  "restore them or set --dataset.missing_images absent")
            log.warning("%s: %d image file(s) of the %s split are missing (first %s); those images are marked absent",
                        name, int((~ok).sum()), s, first)
            missing_total += int((~ok).sum())
        present[s] = ok

    def make(s: str, train: bool) -> ImageTextDataset:
        return ImageTextDataset(splits[s], mods, image_transform(train, image_size, augment, resize), image_size,
                                text_bytes, present[s])

    shapes = {"image": (3, image_size, image_size), "text": (text_bytes,)}
    return DataSplits(
        train=make("train", True), val=make("val", False), test=make("test", False),
        train_eval=make("train", False), modalities=mods, num_classes=len(class_names),
        input_shapes={m: shapes[m] for m in mods},
        default_encoders={m: {"image": "resnet_image", "text": "bert_text"}[m] for m in mods},
        encoder_options={m: {} for m in mods}, class_names=list(class_names),
        info={"name": info_name or name, "root": str(root), "layout": layout, "image_size": image_size,
              "sizes": {s: len(splits[s]) for s in SPLITS}, "missing_images": missing_total},
    )


def _label_index(value: Any, class_names: Sequence[str], where: str) -> int:
    """A label given as a class index or a class name."""
    if isinstance(value, str) and value.strip() in class_names:
        return class_names.index(value.strip())
    try:
        k = int(str(value).strip())
    except ValueError:
        k = -1
    if not 0 <= k < len(class_names):
        raise ConfigError(f"{where}: label {value!r} is not one of 0..{len(class_names) - 1} or "
                          f"{', '.join(class_names)}")
    return k


# ----------------------------------------------------------------------------- Twitter
def _read_tsv(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        rows = [r for r in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if any(c.strip() for c in r)]
    if not rows:
        raise ConfigError(f"{path} is empty; expected a header line and one post per line")
    header = [re.sub(r"^#\d+\s*", "", h.strip()).replace(" ", "").lower() for h in rows[0]]
    return header, rows[1:]


def _parse_twitter_tsv(path: Path, image_dir: Path, text_clean: str, max_words: int | None) -> list[Sample]:
    header, rows = _read_tsv(path)
    need = [c for c in ("label", "imageid", "string") if c not in header]
    if need:
        raise ConfigError(f"{path} has no column {', '.join(need)} (header {header}); expected the header "
                          "'index  #1 Label  #2 ImageID  #3 String  #3 String' (TomBERT) or Label/String/ImageID (MIE code)")
    li, ii = header.index("label"), header.index("imageid")
    strings = [k for k, h in enumerate(header) if h == "string"]
    out = []
    for n, row in enumerate(rows, start=2):
        if len(row) <= max(li, ii, strings[0]):
            raise ConfigError(f"{path} line {n} has {len(row)} fields, the header {len(header)}")
        text = row[strings[0]]
        if len(strings) > 1 and len(row) > strings[1] and "$T$" in text:
            text = text.replace("$T$", row[strings[1]])  # TomBERT: the target back into its tweet
        if text_clean == "mie":
            text = clean_caption(english_words(text), max_words)
        out.append(Sample(str(image_dir / row[ii].strip()), text, _label_index(row[li], SENTIMENT, f"{path} line {n}")))
    return out


def _twitter(year: str, root: str | None, modalities: Modalities, image_size: int, augment: str, resize: str,
             text_clean: str, max_words: int | None, text_bytes: int, val_fraction: float,
             missing_images: str) -> DataSplits:
    name = f"twitter{year}"
    expected = (f"the TomBERT release (ROOT/{name}/{{train,dev,test}}.tsv + ROOT/{name}_images/) or the MIE code's "
                f"layout (ROOT/annotations/{{train,test}}.tsv + ROOT/{name}_images/)")
    r = _check_root(name, root, expected)
    for text_dir, layout in ((r / "annotations", "mie"), (r / name, "tombert"), (r, "tombert")):
        if (text_dir / "train.tsv").is_file():
            break
    else:
        raise ConfigError(f"{name} root {root} lacks train.tsv; expected {expected}")
    image_dir = _first_dir(r / f"{name}_images", r / "images", r.parent / f"{name}_images")
    if image_dir is None:
        raise ConfigError(f"{name} root {root} lacks the image folder {name}_images; expected {expected}")
    files = {"train": text_dir / "train.tsv", "val": _first_file(text_dir, "dev.tsv", "val.tsv", "valid.tsv"),
             "test": _first_file(text_dir, "test.tsv")}
    if files["test"] is None:
        raise ConfigError(f"{name} root {root} lacks test.tsv in {text_dir}; expected {expected}")
    splits = {s: _parse_twitter_tsv(p, image_dir, text_clean, max_words) for s, p in files.items() if p is not None}
    return _build(name, r, layout, splits, SENTIMENT, modalities=modalities, image_size=image_size, augment=augment,
                  resize=resize, text_bytes=text_bytes, val_fraction=val_fraction, missing_images=missing_images)


_TWITTER_DOC = """Twitter-{y} target-oriented multimodal sentiment (3 classes), image + text.

    Options:
        root: the dataset folder (TomBERT release or the MIE code's layout; see mmbalance.data.imagetext).
        modalities: a subset or order of image, text.
        image_size: side of the square image crop (224 in the papers).
        augment: training augmentation: none, crop_flip, or randaugment (the MIE code).
        resize: evaluation resize: square (Resize((S, S)), the MIE code) or center_crop (Resize 256 + CenterCrop).
        text_clean: mie (keep English words, lowercase, drop punctuation, first max_words words) or none.
        max_words: words kept by the mie cleaning (50 in the MIE code's configs/twitter.json).
        text_bytes: length of the UTF-8 byte buffer that carries the text (longer texts are cut).
        val_fraction: fraction of train held out for validation when the layout has no dev.tsv.
        missing_images: absent (mark the image absent, warn) or error.
    """


@register_dataset("twitter2015", summary="Twitter-2015 multimodal sentiment (3 classes), image + text, TomBERT or MIE layout")
def twitter2015(root: str | None = None, modalities: Modalities = None, image_size: PosInt = 224,
                augment: Augment = "randaugment", resize: Resize = "square", text_clean: Literal["none", "mie"] = "mie",
                max_words: PosInt | None = 50, text_bytes: PosInt = 1024, val_fraction: Fraction = 0.1,
                missing_images: Literal["absent", "error"] = "absent") -> DataSplits:
    return _twitter("2015", root, modalities, image_size, augment, resize, text_clean, max_words, text_bytes,
                    val_fraction, missing_images)


@register_dataset("twitter2017", summary="Twitter-2017 multimodal sentiment (3 classes), image + text, TomBERT or MIE layout")
def twitter2017(root: str | None = None, modalities: Modalities = None, image_size: PosInt = 224,
                augment: Augment = "randaugment", resize: Resize = "square", text_clean: Literal["none", "mie"] = "mie",
                max_words: PosInt | None = 50, text_bytes: PosInt = 1024, val_fraction: Fraction = 0.1,
                missing_images: Literal["absent", "error"] = "absent") -> DataSplits:
    return _twitter("2017", root, modalities, image_size, augment, resize, text_clean, max_words, text_bytes,
                    val_fraction, missing_images)


twitter2015.__doc__ = _TWITTER_DOC.format(y="2015")
twitter2017.__doc__ = _TWITTER_DOC.format(y="2017")


# ----------------------------------------------------------------------------- Sarcasm
def _keyword_hit(text: str) -> bool:
    words = text.split()
    return any(k in words for k in SARCASM_KEYWORDS)


def _parse_sarcasm_txt(path: Path, image_dir: Path, keyword_filter: bool, text_clean: str,
                       max_words: int | None) -> list[Sample]:
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = ast.literal_eval(line.strip())
            except (ValueError, SyntaxError):
                row = None
            if not isinstance(row, (list, tuple)) or len(row) < 3:
                raise ConfigError(f"{path} line {n} is not a list ['<id>', '<text>', ..., label] (the original "
                                  "Sarcasm release)")
            text = str(row[1])
            if keyword_filter and _keyword_hit(text):
                continue
            if text_clean == "mie":
                text = clean_caption(text, max_words)
            out.append(Sample(str(image_dir / f"{row[0]}.jpg"), text, _label_index(row[-1], SARCASM, f"{path} line {n}")))
    return out


def _parse_sarcasm_json(path: Path, image_dir: Path, keyword_filter: bool, text_clean: str,
                        max_words: int | None) -> list[Sample]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, list):
        raise ConfigError(f"{path} must hold a JSON list of {{\"image\", \"text\", \"label\"}} objects")
    out = []
    for n, ann in enumerate(data):
        if not isinstance(ann, Mapping) or not {"image", "text", "label"} <= set(ann):
            raise ConfigError(f"{path} entry {n} lacks image/text/label (the MIE code's annotation format)")
        text = str(ann["text"])
        if keyword_filter and _keyword_hit(text):
            continue
        if text_clean == "mie":
            text = clean_caption(text, max_words)
        image = str(ann["image"]).replace("\\", "/").split("/")[-1]
        out.append(Sample(str(image_dir / image), text, _label_index(ann["label"], SARCASM, f"{path} entry {n}")))
    return out


@register_dataset("sarcasm", summary="Twitter multimodal sarcasm detection (2 classes), image + text, original or MIE layout")
def sarcasm(root: str | None = None, modalities: Modalities = None, image_size: PosInt = 224,
            augment: Augment = "randaugment", resize: Resize = "square", text_clean: Literal["none", "mie"] = "mie",
            max_words: PosInt | None = 50, keyword_filter: bool | None = None, text_bytes: PosInt = 1024,
            val_fraction: Fraction = 0.1, missing_images: Literal["absent", "error"] = "absent") -> DataSplits:
    """Multimodal sarcasm detection on Twitter (Cai et al. 2019; 2 classes), image + text.

    Options:
        root: the dataset folder (original release or the MIE code's layout; see mmbalance.data.imagetext).
        modalities: a subset or order of image, text.
        image_size: side of the square image crop (224 in the papers).
        augment: training augmentation: none, crop_flip, or randaugment (the MIE code).
        resize: evaluation resize: square (the MIE code) or center_crop.
        text_clean: mie (lowercase, drop punctuation, first max_words words) or none.
        max_words: words kept by the mie cleaning (50: max_tokens of the MIE code's configs/sarcasm.json).
        keyword_filter: drop posts whose text contains a sarcasm keyword; null = the layout's own code (on for the original release, off for the MIE layout).
        text_bytes: length of the UTF-8 byte buffer that carries the text.
        val_fraction: fraction of train held out for validation when the layout has no validation file.
        missing_images: absent (mark the image absent, warn) or error.
    """
    expected = ("the original release (ROOT/text/{train,valid2,test2}.txt + ROOT/dataset_image/) or the MIE code's "
                "layout (ROOT/annotations/{train,test}_data.json + ROOT/images/)")
    r = _check_root("sarcasm", root, expected)
    if (r / "annotations" / "train_data.json").is_file():
        layout, folder = "mie", r / "annotations"
        files = {"train": folder / "train_data.json",
                 "val": _first_file(folder, "valid_data.json", "val_data.json", "dev_data.json"),
                 "test": _first_file(folder, "test_data.json")}
        parse = _parse_sarcasm_json
    elif (r / "text" / "train.txt").is_file():
        layout, folder = "original", r / "text"
        files = {"train": folder / "train.txt", "val": _first_file(folder, "valid2.txt", "valid.txt"),
                 "test": _first_file(folder, "test2.txt", "test.txt")}
        parse = _parse_sarcasm_txt
    else:
        raise ConfigError(f"sarcasm root {root} lacks text/train.txt and annotations/train_data.json; expected {expected}")
    if files["test"] is None:
        raise ConfigError(f"sarcasm root {root} lacks the test file in {folder}; expected {expected}")
    image_dir = _first_dir(r / "dataset_image", r / "images")
    if image_dir is None:
        raise ConfigError(f"sarcasm root {root} lacks the image folder dataset_image (or images); expected {expected}")
    kf = (layout == "original") if keyword_filter is None else keyword_filter
    splits = {s: parse(p, image_dir, kf, text_clean, max_words) for s, p in files.items() if p is not None}
    return _build("sarcasm", r, layout, splits, SARCASM, modalities=modalities, image_size=image_size, augment=augment,
                  resize=resize, text_bytes=text_bytes, val_fraction=val_fraction, missing_images=missing_images)


# ----------------------------------------------------------------------------- JSONL (QMF / MMBT)
def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path} line {n} is not JSON ({e.msg})") from None
            if not isinstance(row, dict) or not {"text", "img", "label"} <= set(row):
                raise ConfigError(f"{path} line {n} lacks text/img/label (the QMF/MMBT jsonl format: "
                                  '{"id", "label", "text", "img"})')
            rows.append(row)
    return rows


def _jsonl_splits(root: Path, class_names: list[str] | None) -> tuple[dict[str, list[Sample]], list[str]]:
    """Splits of a QMF/MMBT jsonl folder; classes: ``class_names`` or the sorted labels of train."""
    files = {"train": root / "train.jsonl", "val": _first_file(root, "dev.jsonl", "val.jsonl"),
             "test": _first_file(root, "test.jsonl")}
    rows = {s: _read_jsonl(p) for s, p in files.items() if p is not None}
    names = class_names or sorted({str(r["label"]) for r in rows["train"]})
    splits = {}
    for s, rs in rows.items():
        splits[s] = [Sample(str(root / str(x["img"])), str(x["text"] or ""), _label_index(str(x["label"]), names,
                                                                                      f"{files[s]} id {x.get('id')}"))
                     for x in rs]
    return splits, names


# ----------------------------------------------------------------------------- Food-101
def _upmc_splits(root: Path) -> tuple[dict[str, list[Sample]], list[str]]:
    names = sorted(p.name for p in (root / "images" / "train").iterdir() if p.is_dir())
    splits: dict[str, list[Sample]] = {}
    for s in ("train", "test"):
        out = []
        folder = root / "images" / s
        for k, label in enumerate(names):
            cls_dir = folder / label
            if not cls_dir.is_dir():
                continue
            for img in sorted(cls_dir.iterdir()):
                m = re.search(r"_(?P<num>[\d-]+)\.\w+$", img.name)
                if not m or img.suffix.lower() not in IMAGE_EXTS:
                    continue
                txt = root / "texts_txt" / label / f"{label}_{m.group('num')}.txt"
                if not txt.is_file():  # MMBT's conversion drops an image without its text
                    continue
                out.append(Sample(str(img), mmbt_clean(txt.read_text(encoding="utf-8", errors="replace")), k))
        splits[s] = out
    return splits, names


@register_dataset("food101", summary="UPMC Food-101 recipes (101 classes), image + text, QMF/MMBT jsonl or UPMC layout")
def food101(root: str | None = None, modalities: Modalities = None, image_size: PosInt = 224, augment: Augment = "none",
            resize: Resize = "center_crop", text_bytes: PosInt = 4096, val_fraction: Fraction = 0.1,
            missing_images: Literal["absent", "error"] = "absent") -> DataSplits:
    """UPMC Food-101 (Wang et al. 2015; 101 classes), image + web-page text.

    Options:
        root: the dataset folder (QMF/MMBT jsonl layout or the UPMC release; see mmbalance.data.imagetext).
        modalities: a subset or order of image, text.
        image_size: side of the square image crop (224 in the papers).
        augment: training augmentation: none (QMF), crop_flip or randaugment.
        resize: evaluation resize: center_crop (Resize 256 + CenterCrop 224, QMF) or square.
        text_bytes: length of the UTF-8 byte buffer that carries the text (BERT reads at most 512 tokens).
        val_fraction: fraction of train held out for validation when the layout has no dev.jsonl (MMBT held out 5,000).
        missing_images: absent (mark the image absent, warn) or error.
    """
    expected = ("the QMF/MMBT layout (ROOT/{train,dev,test}.jsonl + the images they name) or the UPMC release "
                "(ROOT/images/{train,test}/<class>/ + ROOT/texts_txt/<class>/)")
    r = _check_root("food101", root, expected)
    if (r / "train.jsonl").is_file():
        layout = "jsonl"
        splits, names = _jsonl_splits(r, None)
    elif (r / "images" / "train").is_dir() and (r / "texts_txt").is_dir():
        layout = "upmc"
        splits, names = _upmc_splits(r)
    else:
        raise ConfigError(f"food101 root {root} lacks train.jsonl (and images/train + texts_txt); expected {expected}")
    if not splits.get("test"):
        raise ConfigError(f"food101 root {root} has no test samples (test.jsonl or images/test); expected {expected}")
    return _build("food101", r, layout, splits, names, modalities=modalities, image_size=image_size, augment=augment,
                  resize=resize, text_bytes=text_bytes, val_fraction=val_fraction, missing_images=missing_images)


# ----------------------------------------------------------------------------- MVSA
def _read_text_file(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return raw.decode("latin-1").strip()  # how QMF's jsonl reads the release's non-UTF-8 tweets


def _mvsa_release(root: Path, variant: str, expected: str) -> list[Sample]:
    path = root / "labelResultAll.txt"
    lines = [ln for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    if not lines:
        raise ConfigError(f"{path} is empty; expected 'ID<TAB>text,image' lines")
    if not lines[0].split("\t")[0].strip().isdigit():  # the header line "ID<TAB>text,image"
        lines = lines[1:]
    rows = [ln.split("\t") for ln in lines]
    annotators = {len(r) - 1 for r in rows}
    want = 1 if variant == "single" else 3
    if annotators != {want}:
        raise ConfigError(f"{path} has {sorted(annotators)} annotation column(s) per post but MVSA-{variant.capitalize()} "
                          f"has {want}; set --dataset.variant {'multiple' if variant == 'single' else 'single'}")
    out = []
    for n, row in enumerate(rows, start=2):
        pairs = [c.strip().split(",") for c in row[1:]]
        if any(len(p) != 2 for p in pairs):
            raise ConfigError(f"{path} line {n}: annotations must be 'text,image' pairs, got {row[1:]}")
        label = mvsa_combine(mvsa_majority([p[0] for p in pairs]), mvsa_majority([p[1] for p in pairs]))
        if label is None:
            continue
        if label not in SENTIMENT:
            raise ConfigError(f"{path} line {n}: unknown label {label!r}; expected {', '.join(SENTIMENT)}")
        pid = row[0].strip()
        txt = root / "data" / f"{pid}.txt"
        text = _read_text_file(txt) if txt.is_file() else ""
        out.append(Sample(str(root / "data" / f"{pid}.jpg"), text, SENTIMENT.index(label)))
    if not out:
        raise ConfigError(f"{path} leaves no post after the label rule; expected {expected}")
    return out


@register_dataset("mvsa", summary="MVSA-Single / MVSA-Multiple tweet sentiment (3 classes), image + text, QMF jsonl or release layout")
def mvsa(root: str | None = None, variant: Literal["single", "multiple"] = "single", modalities: Modalities = None,
         image_size: PosInt = 224, augment: Augment = "none", resize: Resize = "center_crop", text_bytes: PosInt = 1024,
         val_fraction: Fraction = 0.1, missing_images: Literal["absent", "error"] = "absent") -> DataSplits:
    """MVSA (Niu et al. 2016) image-text sentiment of tweets (3 classes), image + text.

    Options:
        root: the dataset folder (QMF jsonl layout or the MVSA release; see mmbalance.data.imagetext).
        variant: single (one annotator) or multiple (three annotators, majority per modality); names the results.
        modalities: a subset or order of image, text.
        image_size: side of the square image crop (224 in the papers).
        augment: training augmentation: none (QMF), crop_flip or randaugment.
        resize: evaluation resize: center_crop (Resize 256 + CenterCrop 224, QMF) or square.
        text_bytes: length of the UTF-8 byte buffer that carries the text.
        val_fraction: fraction of train held out for validation when the layout has no dev.jsonl.
        missing_images: absent (mark the image absent, warn) or error.
    """
    expected = ("the QMF layout (ROOT/{train,dev,test}.jsonl + ROOT/data/<id>.jpg) or the MVSA release "
                "(ROOT/labelResultAll.txt + ROOT/data/<id>.jpg and <id>.txt)")
    r = _check_root("mvsa", root, expected)
    if (r / "train.jsonl").is_file():
        layout = "jsonl"
        splits, _ = _jsonl_splits(r, SENTIMENT)
    elif (r / "labelResultAll.txt").is_file():
        if not (r / "data").is_dir():
            raise ConfigError(f"mvsa root {root} lacks the folder data/ (images and texts); expected {expected}")
        layout = "release"
        samples = _mvsa_release(r, variant, expected)
        labels = np.asarray([s.label for s in samples], dtype=np.int64)
        parts = stratified_split(labels, [0.8, 0.1, 0.1], SPLIT_SEED)
        splits = {s: [samples[i] for i in idx] for s, idx in zip(SPLITS, parts)}
        if not splits["test"] and len(splits["train"]) >= 3:  # tiny data: still one test and one val post
            splits["test"], splits["train"] = splits["train"][-1:], splits["train"][:-1]
    else:
        raise ConfigError(f"mvsa root {root} lacks train.jsonl and labelResultAll.txt; expected {expected}")
    if not splits.get("test"):
        raise ConfigError(f"mvsa root {root} has no test samples; expected {expected}")
    return _build("mvsa", r, layout, splits, SENTIMENT, modalities=modalities, image_size=image_size, augment=augment,
                  resize=resize, text_bytes=text_bytes, val_fraction=val_fraction, missing_images=missing_images,
                  info_name=f"mvsa_{variant}")
