"""Tiny image-text fixtures in each published layout, a tiny BERT and tiny ResNet weights.

Images are small JPEGs whose colour is set by the class (plus noise); texts carry a class word,
so both modalities are learnable. Everything is written under a temporary folder.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

COLORS = [(200, 40, 40), (40, 180, 40), (40, 40, 200)]
WORDS = ["bad", "the", "good"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz", "good", "bad", "the", "cat",
         "dog", "is", "##s", "rt", "x"]


def write_image(path: Path, label: int, seed: int = 0, size: tuple[int, int] = (40, 30)) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    a = np.clip(np.array(COLORS[label % len(COLORS)], dtype=np.float64) + rng.normal(0, 20, (size[1], size[0], 3)), 0, 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a.astype(np.uint8)).save(path)


def tiny_bert(folder: Path, pooler: bool = True) -> Path:
    """A randomly initialised 1-layer BERT (hidden 16) and a WordPiece tokenizer, saved to ``folder``."""
    from transformers import BertConfig, BertModel, BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(str(folder))  # positional: vocab_file (v4) / vocab (v5)
    cfg = BertConfig(vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64)
    torch.manual_seed(0)
    BertModel(cfg, add_pooling_layer=pooler).save_pretrained(str(folder))
    return folder


def tiny_resnet(path: Path, arch: str = "resnet50", width: int = 8, fc: bool = True) -> Path:
    """A randomly initialised ResNet state dict with torchvision's key names (``fc`` included)."""
    from mmbalance.models.pretrained import ResNetTrunk

    torch.manual_seed(0)
    trunk = ResNetTrunk(arch, width, 1000 if fc else None)
    for m in trunk.modules():  # non-trivial BN statistics, so eval and train modes differ
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(trunk.state_dict(), path)
    return path


def _sentiment_rows(n: int, start: int = 0) -> list[tuple[int, int]]:
    return [(start + i, i % 3) for i in range(n)]


# ----------------------------------------------------------------------------- Twitter
def twitter_tombert(root: Path, sizes=(("train", 12), ("dev", 6), ("test", 6)), year: str = "2015") -> Path:
    text_dir, img_dir = root / f"twitter{year}", root / f"twitter{year}_images"
    text_dir.mkdir(parents=True, exist_ok=True)
    k = 0
    for split, n in sizes:
        lines = ["index\t#1 Label\t#2 ImageID\t#3 String\t#3 String"]
        for i, y in _sentiment_rows(n):
            img = f"{1000 + k}.jpg"
            write_image(img_dir / img, y, seed=k)
            lines.append(f"{i}\t{y}\t{img}\tRT @ x : $T$ is {WORDS[y]} # cat\tThe dog")
            k += 1
        (text_dir / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return root


def twitter_mie(root: Path, sizes=(("train", 15), ("test", 6)), year: str = "2015") -> Path:
    ann, img_dir = root / "annotations", root / f"twitter{year}_images"
    ann.mkdir(parents=True, exist_ok=True)
    k = 0
    for split, n in sizes:
        lines = ["Label\tString\tImageID"]
        for i, y in _sentiment_rows(n):
            img = f"{2000 + k}.jpg"
            write_image(img_dir / img, y, seed=k)
            lines.append(f"{y}\tThe dog is {WORDS[y]}!\t{img}")
            k += 1
        (ann / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return root


# ----------------------------------------------------------------------------- Sarcasm
def sarcasm_original(root: Path, sizes=(("train", 8), ("valid2", 4), ("test2", 4))) -> Path:
    text_dir, img_dir = root / "text", root / "dataset_image"
    text_dir.mkdir(parents=True, exist_ok=True)
    k = 0
    for split, n in sizes:
        lines = []
        for i in range(n):
            y = i % 2
            pid = str(800000000000000000 + k)
            write_image(img_dir / f"{pid}.jpg", 2 * y, seed=k)
            text = f"the dog is {WORDS[2 * y]}"
            lines.append(repr([pid, text, y]) if split == "train" else repr([pid, text, 1 - y, y]))
            k += 1
        if split == "train":  # dropped by the original code's keyword filter
            write_image(img_dir / "799.jpg", 0)
            lines.append(repr(["799", "so much sarcasm here", 1]))
        (text_dir / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def sarcasm_mie(root: Path, sizes=(("train", 10), ("test", 4))) -> Path:
    ann, img_dir = root / "annotations", root / "images"
    ann.mkdir(parents=True, exist_ok=True)
    k = 0
    for split, n in sizes:
        rows = []
        for i in range(n):
            y = i % 2
            write_image(img_dir / f"{3000 + k}.jpg", 2 * y, seed=k)
            rows.append({"image": f"some/where/{3000 + k}.jpg", "text": f"The dog is {WORDS[2 * y]}!", "label": y})
            k += 1
        if split == "train":  # kept: the MIE code applies no keyword filter
            write_image(img_dir / "3999.jpg", 2)
            rows.append({"image": "3999.jpg", "text": "so good , sarcasm", "label": 1})
        (ann / f"{split}_data.json").write_text(json.dumps(rows))
    return root


# ----------------------------------------------------------------------------- Food-101
FOODS = ["apple_pie", "bibimbap", "churros"]


def food_jsonl(root: Path, sizes=(("train", 9), ("dev", 3), ("test", 3))) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    k = 0
    for split, n in sizes:
        lines = []
        for i in range(n):
            y = i % 3
            img = f"images/{'test' if split == 'test' else 'train'}/{FOODS[y]}/{FOODS[y]}_{k}.jpg"
            write_image(root / img, y, seed=k)
            lines.append(json.dumps({"id": f"{FOODS[y]}_{k}", "label": FOODS[y], "text": f"{WORDS[y]} recipe", "img": img}))
            k += 1
        (root / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return root


def food_upmc(root: Path, per_class=(("train", 4), ("test", 2))) -> Path:
    k = 0
    for split, n in per_class:
        for y, food in enumerate(FOODS):
            for i in range(n):
                write_image(root / "images" / split / food / f"{food}_{k}.jpg", y, seed=k)
                txt = root / "texts_txt" / food / f"{food}_{k}.txt"
                txt.parent.mkdir(parents=True, exist_ok=True)
                txt.write_text(f"The {WORDS[y].upper()}-recipe: ({food})!\n")
                k += 1
    write_image(root / "images" / "train" / FOODS[0] / f"{FOODS[0]}_999.jpg", 0)  # no text: dropped
    return root


# ----------------------------------------------------------------------------- MVSA
def mvsa_jsonl(root: Path, sizes=(("train", 9), ("dev", 3), ("test", 3))) -> Path:
    names = ["negative", "neutral", "positive"]
    root.mkdir(parents=True, exist_ok=True)
    k = 0
    for split, n in sizes:
        lines = []
        for i in range(n):
            y = i % 3
            write_image(root / "data" / f"{k}.jpg", y, seed=k)
            lines.append(json.dumps({"id": str(k), "label": names[y], "text": f"the dog is {WORDS[y]} #cat",
                                     "img": f"data/{k}.jpg"}))
            k += 1
        (root / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return root


MVSA_ONE = {0: "negative,negative", 1: "neutral,neutral", 2: "positive,positive"}


def mvsa_release(root: Path, annotators: int = 1, per_class: int = 10) -> Path:
    """``labelResultAll.txt`` + ``data/<id>.{jpg,txt}``; two extra posts the label rule drops."""
    names = ["negative", "neutral", "positive"]
    (root / "data").mkdir(parents=True, exist_ok=True)
    lines = ["ID" + "\ttext,image" * annotators]
    pid = 1
    for i in range(3 * per_class):
        y = i % 3
        if annotators == 1:
            ann = "neutral," + names[y] if (y != 1 and i % 2) else MVSA_ONE[y]  # one neutral -> the other label
        else:
            ann = "\t".join([MVSA_ONE[y], MVSA_ONE[y], "neutral,neutral"])  # majority per modality
        lines.append(f"{pid}\t{ann}")
        write_image(root / "data" / f"{pid}.jpg", y, seed=pid)
        (root / "data" / f"{pid}.txt").write_bytes(f"the dog is {WORDS[y]} caf\xe9".encode("latin-1"))
        pid += 1
    drop = "positive,negative" if annotators == 1 else "\t".join(["positive,negative", "negative,positive",
                                                                  "neutral,neutral"])
    lines.append(f"{pid}\t{drop}")  # positive text vs negative image: dropped
    write_image(root / "data" / f"{pid}.jpg", 0)
    (root / "data" / f"{pid}.txt").write_text("conflict")
    if annotators == 3:
        pid += 1
        lines.append(f"{pid}\tpositive,positive\tnegative,negative\tneutral,neutral")  # no majority: dropped
        write_image(root / "data" / f"{pid}.jpg", 0)
    (root / "labelResultAll.txt").write_text("\n".join(lines) + "\n")
    return root


# name -> (dataset, writer, dataset options)
LAYOUTS = {
    "twitter_tombert": ("twitter2015", twitter_tombert, {}),
    "twitter_mie": ("twitter2015", twitter_mie, {}),
    "sarcasm_original": ("sarcasm", sarcasm_original, {}),
    "sarcasm_mie": ("sarcasm", sarcasm_mie, {}),
    "food101_jsonl": ("food101", food_jsonl, {}),
    "food101_upmc": ("food101", food_upmc, {}),
    "mvsa_jsonl": ("mvsa", mvsa_jsonl, {}),
    "mvsa_single": ("mvsa", mvsa_release, {}),
    "mvsa_multiple": ("mvsa", lambda r: mvsa_release(r, annotators=3), {"variant": "multiple"}),
}
