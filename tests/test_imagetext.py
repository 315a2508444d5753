"""Image-text datasets in their published layouts, and encoders on local pretrained weights."""
import copy
import json
import logging
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from imagetext_fixtures import (LAYOUTS, WORDS, food_jsonl, mvsa_release, sarcasm_original, tiny_bert, tiny_resnet,
                                twitter_mie, twitter_tombert)
from mmbalance.data import build_dataset
from mmbalance.data.imagetext import (clean_caption, codes_to_text, english_words, image_transform, mmbt_clean,
                                      mvsa_combine, mvsa_majority, text_to_codes)
from mmbalance.models import create_encoder
from mmbalance.registry import ConfigError


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    d = tmp_path_factory.mktemp("weights")
    return {"bert": tiny_bert(d / "bert"), "bert_nopool": tiny_bert(d / "bert_nopool", pooler=False),
            "r50": tiny_resnet(d / "r50.pth")}


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    base = tmp_path_factory.mktemp("layouts")
    return {name: writer(base / name) for name, (_, writer, _) in LAYOUTS.items()}


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


# ----------------------------------------------------------------------------- text transport and cleaning
def test_text_codes_round_trip_truncation_and_padding():
    for text in ["", "plain", "café ñandú 😀", "x" * 50]:
        assert codes_to_text(text_to_codes(text, 64).unsqueeze(0)) == [text[:64]]
    c = text_to_codes("aé", 2)  # 'é' is two bytes: cut whole, never half
    assert c.tolist() == [97.0, 0.0] and c.dtype == torch.float32
    assert codes_to_text(torch.zeros(2, 8)) == ["", ""]  # an absent text (zero input) is empty
    noisy = text_to_codes("dog", 6).unsqueeze(0) + 0.3  # any float decodes (rounded, clamped)
    assert codes_to_text(noisy) == ["dog"]
    assert text_to_codes("a\x00b", 4).tolist() == [97.0, 98.0, 0.0, 0.0]


def test_text_cleaning_rules_by_hand():
    assert english_words("RT @ ltsChuckBass : Chuck is #1 everything # MCM") == "RT ltsChuckBass Chuck is everything MCM"
    assert clean_caption("The DOG, isn't it?  (well-known) a/b <person>", None) == "the dog isnt it well known a b person"
    assert clean_caption("one two three four", 2) == "one two"
    assert mmbt_clean("Apple-Pie: BEST (recipe)!\nyes") == "apple pie best recipe yes"


def test_mvsa_label_rule_table():
    assert mvsa_majority(["positive"]) == "positive"
    assert mvsa_majority(["neutral", "negative", "negative"]) == "negative"
    assert mvsa_majority(["neutral", "negative", "positive"]) is None
    table = {("positive", "positive"): "positive", ("neutral", "negative"): "negative",
             ("positive", "neutral"): "positive", ("positive", "negative"): None, ("negative", "positive"): None,
             ("neutral", "neutral"): "neutral", (None, "positive"): None}
    for (t, i), want in table.items():
        assert mvsa_combine(t, i) == want, (t, i)


# ----------------------------------------------------------------------------- layouts
def test_every_layout_parses_with_its_splits_labels_and_texts(layouts):
    want = {  # (train, val, test), layout, name in results
        "twitter_tombert": ((12, 6, 6), "tombert", "twitter2015"),
        "twitter_mie": ((12, 3, 6), "mie", "twitter2015"),  # no dev.tsv: 10% of each class of train held out
        "sarcasm_original": ((8, 4, 4), "original", "sarcasm"),  # the 'sarcasm' keyword post is filtered out
        "sarcasm_mie": ((9, 2, 4), "mie", "sarcasm"),  # the keyword post is kept (no filter in the MIE code)
        "food101_jsonl": ((9, 3, 3), "jsonl", "food101"),
        "food101_upmc": ((11, 1, 6), "upmc", "food101"),  # the image without a text is dropped
        "mvsa_jsonl": ((9, 3, 3), "jsonl", "mvsa_single"),
        "mvsa_single": ((24, 3, 3), "release", "mvsa_single"),  # 31 posts, the positive/negative one dropped
        "mvsa_multiple": ((24, 3, 3), "release", "mvsa_multiple"),
    }
    for name, (ds, _, opts) in LAYOUTS.items():
        d = build_dataset(ds, root=str(layouts[name]), image_size=32, **opts)
        sizes, layout, label = want[name]
        assert (len(d.train), len(d.val), len(d.test)) == sizes, name
        assert d.info["layout"] == layout and d.info["name"] == label, name
        assert d.modalities == ["image", "text"] and d.default_encoders == {"image": "resnet_image", "text": "bert_text"}
        for split in (d.train, d.val, d.test):
            for i in range(len(split)):  # the text names the class word of its label, the image file exists
                y = int(split.labels[i])
                word = WORDS[2 * y] if ds == "sarcasm" else WORDS[y]
                assert word in split.samples[i].text.lower(), (name, split.samples[i])
                assert Path(split.samples[i].image).is_file()
    tw = build_dataset("twitter2015", root=str(layouts["twitter_tombert"]))
    assert tw.train.samples[0].text == "rt x the dog is bad cat"  # $T$ -> target, then the MIE cleaning
    raw = build_dataset("twitter2015", root=str(layouts["twitter_tombert"]), text_clean="none")
    assert raw.train.samples[0].text == "RT @ x : The dog is bad # cat"
    assert tw.class_names == ["negative", "neutral", "positive"]
    sc = build_dataset("sarcasm", root=str(layouts["sarcasm_original"]), keyword_filter=False)
    assert len(sc.train) == 9  # the keyword post is kept without the filter
    assert build_dataset("sarcasm", root=str(layouts["sarcasm_original"])).val.labels.tolist() == [0, 1, 0, 1]
    filtered = build_dataset("sarcasm", root=str(layouts["sarcasm_mie"]), keyword_filter=True)
    assert len(filtered.train) + len(filtered.val) == 10
    mv = build_dataset("mvsa", root=str(layouts["mvsa_single"]))
    texts = [s.text for part in (mv.train, mv.val, mv.test) for s in part.samples]
    assert "conflict" not in texts and all(t.endswith("café") for t in texts)  # latin-1 text decoded
    food = build_dataset("food101", root=str(layouts["food101_upmc"]))
    assert food.class_names == ["apple_pie", "bibimbap", "churros"]
    assert food.test.samples[0].text == "the bad recipe apple pie "  # MMBT's text formatting


def test_batch_contract_transforms_and_train_eval(layouts):
    d = build_dataset("twitter2015", root=str(layouts["twitter_tombert"]), image_size=32, text_bytes=64)
    assert d.input_shapes == {"image": (3, 32, 32), "text": (64,)}
    s = d.test[0]
    assert set(s) == {"inputs", "label", "index", "present"} and int(s["index"]) == 0
    img, txt = s["inputs"]["image"], s["inputs"]["text"]
    assert img.shape == (3, 32, 32) and img.dtype == torch.float32 and 0.0 <= float(img.min()) and float(img.max()) <= 1.0
    assert txt.shape == (64,) and codes_to_text(txt[None]) == [d.test.samples[0].text]
    assert bool(s["present"]["image"]) and bool(s["present"]["text"])
    from PIL import Image

    expected = image_transform(False, 32, "none", "square")(Image.open(d.test.samples[0].image).convert("RGB"))
    torch.testing.assert_close(img, expected)  # evaluation: Resize((32, 32)) bicubic
    assert torch.equal(d.test[0]["inputs"]["image"], d.test[0]["inputs"]["image"])
    torch.manual_seed(0)
    assert not torch.equal(d.train[0]["inputs"]["image"], d.train[0]["inputs"]["image"])  # training augmentation
    assert d.train_eval.samples == d.train.samples
    assert torch.equal(d.train_eval[0]["inputs"]["image"], d.train_eval[0]["inputs"]["image"])
    batch = next(iter(DataLoader(d.train, batch_size=4)))
    assert batch["inputs"]["image"].shape == (4, 3, 32, 32) and batch["inputs"]["text"].shape == (4, 64)
    one = build_dataset("twitter2015", root=str(layouts["twitter_tombert"]), modalities=["text"], image_size=32)
    assert list(one.train[0]["inputs"]) == ["text"] and one.default_encoders == {"text": "bert_text"}
    q = build_dataset("food101", root=str(layouts["food101_jsonl"]), image_size=32)
    im = Image.open(q.train.samples[0].image).convert("RGB")  # QMF: Resize + CenterCrop everywhere, no augmentation
    from torchvision import transforms as T

    torch.testing.assert_close(q.train[0]["inputs"]["image"], T.Compose([T.Resize(37), T.CenterCrop(32), T.ToTensor()])(im))


def test_missing_and_unreadable_images(tmp_path, caplog):
    root = twitter_tombert(tmp_path / "tw")
    d0 = build_dataset("twitter2015", root=str(root), image_size=32)
    gone = Path(d0.test.samples[1].image)
    gone.unlink()
    Path(d0.test.samples[2].image).write_bytes(b"not a jpeg")
    with caplog.at_level(logging.WARNING, logger="mmbalance"):
        d = build_dataset("twitter2015", root=str(root), image_size=32)
    assert "1 image file(s) of the test split are missing" in caplog.text
    assert d.test.present["image"].tolist() == [True, False, True, True, True, True]
    s = d.test[1]
    assert not bool(s["present"]["image"]) and float(s["inputs"]["image"].abs().sum()) == 0.0
    with caplog.at_level(logging.WARNING, logger="mmbalance"):
        bad = d.test[2]  # exists but cannot be decoded: absent at read time
    assert not bool(bad["present"]["image"]) and float(bad["inputs"]["image"].abs().sum()) == 0.0
    assert "cannot read image" in caplog.text
    with pytest.raises(ConfigError) as e:
        build_dataset("twitter2015", root=str(root), missing_images="error")
    assert "missing" in one_line(e) and str(gone) in str(e.value)


def test_wrong_layouts_give_one_line(tmp_path, layouts):
    cases = [
        ("twitter2015", {}, "needs the option root"),
        ("twitter2015", {"root": str(tmp_path / "nope")}, "is not a folder"),
        ("twitter2015", {"root": str(tmp_path)}, "lacks train.tsv; expected the TomBERT release"),
        ("twitter2017", {"root": str(layouts["twitter_tombert"])}, "lacks train.tsv"),  # the 2015 files only
        ("sarcasm", {"root": str(tmp_path)}, "lacks text/train.txt and annotations/train_data.json"),
        ("food101", {"root": str(tmp_path)}, "lacks train.jsonl"),
        ("mvsa", {"root": str(tmp_path)}, "lacks train.jsonl and labelResultAll.txt"),
        ("mvsa", {"root": str(layouts["mvsa_multiple"])}, "set --dataset.variant multiple"),
        ("twitter2015", {"root": str(layouts["twitter_tombert"]), "modalities": ["audio"]}, "takes"),
        ("twitter2015", {"root": str(layouts["twitter_tombert"]), "image_size": 0}, "takes"),
    ]
    for ds, opts, text in cases:
        with pytest.raises(ConfigError) as e:
            build_dataset(ds, **opts)
        assert text in one_line(e), (ds, opts, str(e.value))
    broken = twitter_mie(tmp_path / "tw_broken")
    (broken / "annotations" / "test.tsv").write_text("Label\tText\n1\thello\n")
    with pytest.raises(ConfigError) as e:
        build_dataset("twitter2015", root=str(broken))
    assert "has no column imageid, string" in one_line(e)
    (broken / "annotations" / "test.tsv").write_text("Label\tString\tImageID\n7\thello\t1.jpg\n")
    with pytest.raises(ConfigError) as e:
        build_dataset("twitter2015", root=str(broken))
    assert "label '7'" in one_line(e) and "line 2" in str(e.value)
    sj = food_jsonl(tmp_path / "food_broken")
    (sj / "dev.jsonl").write_text('{"text": "x", "label": "apple_pie"}\n')
    with pytest.raises(ConfigError) as e:
        build_dataset("food101", root=str(sj))
    assert "lacks text/img/label" in one_line(e)
    so = sarcasm_original(tmp_path / "sarc_broken")
    (so / "text" / "test2.txt").write_text("not a list\n")
    with pytest.raises(ConfigError) as e:
        build_dataset("sarcasm", root=str(so))
    assert "is not a list" in one_line(e)
    mv = mvsa_release(tmp_path / "mvsa_img", per_class=4)
    import shutil

    shutil.rmtree(mv / "data")
    with pytest.raises(ConfigError) as e:
        build_dataset("mvsa", root=str(mv))
    assert "lacks the folder data/" in one_line(e)


# ----------------------------------------------------------------------------- encoders
def _codes(*texts: str, n: int = 48) -> torch.Tensor:
    return torch.stack([text_to_codes(t, n) for t in texts])


def test_bert_text_pooling_against_the_model_itself(weights):
    from transformers import AutoModel, AutoTokenizer

    ref = AutoModel.from_pretrained(str(weights["bert"]), local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(str(weights["bert"]), local_files_only=True)
    texts = ["the dog is good", "bad cat", ""]
    enc = tok(texts, padding="longest", return_tensors="pt")
    assert not (enc["input_ids"] == tok.unk_token_id).any()  # the fixture's WordPiece vocabulary is in use
    with torch.no_grad():
        out = ref(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    mask = enc["attention_mask"].unsqueeze(-1).float()
    want = {"cls": out.last_hidden_state[:, 0], "pooler": out.pooler_output,
            "mean": (out.last_hidden_state * mask).sum(1) / mask.sum(1)}
    for pooling, expected in want.items():
        e = create_encoder("bert_text", (48,), path=str(weights["bert"]), pooling=pooling).eval()
        assert e.out_dim == 16
        with torch.no_grad():
            torch.testing.assert_close(e(_codes(*texts)), expected, atol=1e-5, rtol=1e-5)
    e = create_encoder("bert_text", (48,), path=str(weights["bert"]), max_length=3).eval()
    assert e.tokenize(_codes("the dog is good"))["input_ids"].shape == (1, 3)  # [CLS] the [SEP]


def test_frozen_encoder_is_outside_the_module_tree_and_fine_tuned_is_inside(weights):
    frozen = create_encoder("bert_text", (48,), path=str(weights["bert"]), freeze=True)
    tuned = create_encoder("bert_text", (48,), path=str(weights["bert"]), freeze=False)
    assert list(frozen.parameters()) == [] and frozen.state_dict() == {}
    assert len(list(tuned.parameters())) > 10 and any(k.startswith("backbone.") for k in tuned.state_dict())
    frozen.train()
    assert not frozen.net.training  # stays in eval mode (no dropout) whatever the model's mode
    x = _codes("the dog is good", "bad")
    tuned.eval()
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), tuned(x))
    y = frozen(x)
    assert not y.requires_grad  # no autograd through a frozen network
    tuned.train()
    tuned(x).sum().backward()
    assert all(p.grad is not None for n, p in tuned.named_parameters() if "embeddings.word" in n)
    twin = copy.deepcopy(frozen)
    assert twin.net is frozen.net  # copies share the frozen network
    assert copy.deepcopy(tuned).backbone is not tuned.backbone
    frozen.double()  # dtype/device moves reach the hidden network
    assert next(frozen.net.parameters()).dtype == torch.float64
    r = create_encoder("resnet_image", (3, 32, 32), weights=str(weights["r50"]), width=8, freeze=True)
    assert list(r.parameters()) == [] and r.state_dict() == {}


def test_resnet_image_matches_torchvision(weights, tmp_path):
    import torchvision

    torch.manual_seed(0)
    tv = torchvision.models.resnet50().eval()  # random init: nothing is downloaded
    for m in tv.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
    path = tmp_path / "resnet50-test.pth"
    torch.save(tv.state_dict(), path)
    x = torch.rand(2, 3, 64, 64)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    xn = (x - mean) / std
    with torch.no_grad():
        logits = tv(xn)
        tv.fc = torch.nn.Identity()
        pooled = tv(xn)
        e = create_encoder("resnet_image", (3, 64, 64), weights=str(path)).eval()
        assert e.out_dim == 2048
        torch.testing.assert_close(e(x), pooled, atol=1e-4, rtol=1e-4)
        fc = create_encoder("resnet_image", (3, 64, 64), weights=str(path), head="fc").eval()
        assert fc.out_dim == 1000
        torch.testing.assert_close(fc(x), logits, atol=1e-4, rtol=1e-4)  # the MIE code's 1000-d features
        r3 = create_encoder("resnet_image", (3, 64, 64), weights=str(path), pool_regions=3).eval()
        assert r3.out_dim == 3 * 2048
        maps = torch.nn.Sequential(*list(tv.children())[:-2])(xn)
        torch.testing.assert_close(r3(x), torch.flatten(torch.nn.functional.adaptive_avg_pool2d(maps, (3, 1)), 1),
                                   atol=1e-4, rtol=1e-4)
        clip_norm = create_encoder("resnet_image", (3, 64, 64), weights=str(path), mean=[0.5, 0.5, 0.5],
                                   std=[0.25, 0.25, 0.25]).eval()
        torch.testing.assert_close(clip_norm(x), tv((x - 0.5) / 0.25), atol=1e-4, rtol=1e-4)  # mean/std options


def test_missing_or_wrong_weights_give_one_line(weights, tmp_path):
    cases = [
        ("bert_text", (48,), {}, "needs option path (--model.encoders.text.path DIR)"),
        ("bert_text", (48,), {"path": str(tmp_path / "none")}, "is not a folder"),
        ("bert_text", (48,), {"path": str(tmp_path)}, "lacks config.json"),
        ("bert_text", (48,), {"path": str(weights["bert_nopool"]), "pooling": "pooler"}, "no trained pooler weights"),
        ("bert_text", (3, 32, 32), {"path": str(weights["bert"])}, "1-D buffer of UTF-8 byte codes"),
        ("resnet_image", (3, 32, 32), {}, "needs option weights (--model.encoders.image.weights FILE)"),
        ("resnet_image", (3, 32, 32), {"weights": str(tmp_path / "resnet50-0676ba61.pth")},
         "weights file not found: " + str(tmp_path / "resnet50-0676ba61.pth")),
        ("resnet_image", (3, 32, 32), {"weights": str(weights["r50"])}, "do not fit resnet50 width 64"),
        ("resnet_image", (3, 32, 32), {"weights": str(weights["r50"]), "width": 8, "arch": "resnet18"}, "do not fit"),
        ("resnet_image", (3, 32, 32), {"weights": str(weights["r50"]), "from_scratch": True}, "not both"),
        ("resnet_image", (48,), {"from_scratch": True}, "RGB images"),
        ("resnet_image", (3, 32, 32), {"from_scratch": True, "mean": [0.5]}, "3 numbers"),
        ("clip_image", (3, 32, 32), {}, "needs option checkpoint"),
        ("clip_image", (3, 32, 32), {"arch": "hf-hub:x/y"}, "would download"),
    ]
    (tmp_path / "bad.pth").write_bytes(b"garbage")
    cases.append(("resnet_image", (3, 32, 32), {"weights": str(tmp_path / "bad.pth")}, "cannot read weights"))
    for name, shape, opts, text in cases:
        with pytest.raises(ConfigError) as e:
            create_encoder(name, shape, **opts)
        assert text in one_line(e) and len(str(e.value)) < 400, (name, opts, str(e.value))
    nowt = tmp_path / "noweights"
    nowt.mkdir()
    (nowt / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ConfigError) as e:
        create_encoder("bert_text", (48,), path=str(nowt))
    assert "lacks the weights file model.safetensors" in one_line(e)
    notok = tmp_path / "notok"
    notok.mkdir()
    for f in ("config.json", "model.safetensors"):
        (notok / f).write_bytes((weights["bert"] / f).read_bytes())
    with pytest.raises(ConfigError) as e:
        create_encoder("bert_text", (48,), path=str(notok))
    assert "no usable tokenizer" in one_line(e)


def test_clip_towers_through_open_clip_from_a_local_checkpoint(tmp_path):
    import open_clip

    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    config = tmp_path / "mmbalance-tiny-clip.json"
    config.write_text(json.dumps(cfg))
    open_clip.add_model_config(str(config))
    torch.manual_seed(0)
    ref = open_clip.create_model("mmbalance-tiny-clip").eval()
    ckpt = tmp_path / "tiny.pt"
    torch.save(ref.state_dict(), ckpt)
    img = create_encoder("clip_image", (3, 32, 32), arch="mmbalance-tiny-clip", checkpoint=str(ckpt), config=str(config)).eval()
    txt = create_encoder("clip_text", (48,), arch="mmbalance-tiny-clip", checkpoint=str(ckpt), config=str(config),
                         freeze=True)
    x = torch.rand(2, 3, 32, 32)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    tok = open_clip.get_tokenizer("mmbalance-tiny-clip")
    with torch.no_grad():
        torch.testing.assert_close(img(x), ref.encode_image((x - mean) / std), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(txt(_codes("a dog", "")), ref.encode_text(tok(["a dog", ""])), atol=1e-5, rtol=1e-5)
    assert img.out_dim == txt.out_dim == 16 and txt.state_dict() == {}
    with pytest.raises(ConfigError) as e:
        create_encoder("clip_image", (3, 64, 64), arch="mmbalance-tiny-clip", checkpoint=str(ckpt))
    assert "set --dataset.image_size 32" in one_line(e)


# ----------------------------------------------------------------------------- training through the CLI
def _train(root, ds, opts, weights, method, out, extra=()):
    from mmbalance.cli import main

    args = ["train", "--dataset", ds, "--dataset.root", str(root), "--dataset.image_size", "32",
            "--model.encoders.text.path", str(weights["bert"]), "--model.encoders.image.weights", str(weights["r50"]),
            "--model.encoders.image.width", "8", "--method", method, "--epochs", "1", "--batch-size", "4",
            "--train.drop_last", "true", "--train.progress", "off", "--train.probe", "false", "--output-dir", str(out)]
    for k, v in opts.items():
        args += [f"--dataset.{k}", str(v)]
    return main([*args, *extra])


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_one_epoch_of_joint_and_arl_on_each_layout_through_the_cli(layout, layouts, weights, tmp_path):
    ds, _, opts = LAYOUTS[layout]
    for method in ("joint", "arl"):
        assert _train(layouts[layout], ds, opts, weights, method, tmp_path / method) == 0
        res = json.loads((tmp_path / method / "results.json").read_text())
        assert res["method"] == method and res["dataset"] == build_dataset(ds, root=str(layouts[layout]), **opts).info["name"]
        assert set(res["test"]["per_modality"]) == {"image", "text"} and 0.0 <= res["test"]["accuracy"] <= 1.0
        state = torch.load(tmp_path / method / "best.pt", weights_only=True)
        keys = state["model"] if "model" in state else state
        assert any("encoders.text.backbone" in k for k in keys)  # fine-tuned by default: in the checkpoint


def test_frozen_encoders_train_heads_only_and_stay_out_of_checkpoints(layouts, weights, tmp_path):
    code = _train(layouts["twitter_tombert"], "twitter2015", {}, weights, "joint", tmp_path / "run",
                  ("--model.encoders.text.freeze", "true", "--model.encoders.image.freeze", "true"))
    assert code == 0
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    model = state["model"]
    assert not any(k.startswith("encoders.") for k in model)  # only the fusion head is trained and saved
    from mmbalance.api import load_run

    run = load_run(tmp_path / "run")  # rebuilt from the same local weights
    d = build_dataset("twitter2015", root=str(layouts["twitter_tombert"]), image_size=32)
    assert run.evaluate(d.test)["accuracy"] == json.loads((tmp_path / "run" / "results.json").read_text())["test"]["accuracy"]


def test_missing_weights_file_through_the_cli_is_one_line(layouts, weights, tmp_path, capsys):
    from mmbalance.cli import main

    code = main(["train", "--dataset", "twitter2015", "--dataset.root", str(layouts["twitter_tombert"]),
                 "--model.encoders.text.path", str(weights["bert"]),
                 "--model.encoders.image.weights", str(tmp_path / "resnet50-0676ba61.pth"), "--epochs", "1",
                 "--train.progress", "off", "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert "weights file not found" in err and "resnet50-0676ba61.pth" in err
    code = main(["train", "--dataset", "twitter2015", "--dataset.root", str(tmp_path / "nowhere"), "--epochs", "1",
                 "--output-dir", str(tmp_path / "run2")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "is not a folder" in err


def test_shipped_image_text_recipes_resolve():
    from mmbalance.config import load_config
    from mmbalance.methods import create_method

    base = Path(__file__).resolve().parents[1] / "configs"
    for ds in ("twitter2015", "sarcasm", "food101", "mvsa"):
        files = sorted((base / ds).glob("*.yaml"))
        assert {"base", "joint", "arl"} <= {f.stem for f in files}, ds
        for f in files:
            cfg = load_config(f)
            assert cfg.dataset.name == ds
            create_method(cfg.method.name, **cfg.method.options)
            enc = cfg.model.encoders
            assert enc["text"]["name"] == "bert_text" and enc["image"]["name"] == "resnet_image"
            assert cfg.optim.name == "adam" and cfg.optim.lr in (1e-5, 5e-5)


def test_command_line_encoder_paths_keep_the_recipes_encoder_options():
    from mmbalance.config import load_config, parse_overrides

    recipe = Path(__file__).resolve().parents[1] / "configs" / "food101" / "joint.yaml"
    cfg = load_config(recipe, parse_overrides(["--model.encoders.image.weights", "r152.pth",
                                               "--model.encoders.text.path", "bert"]))
    image, text = cfg.model.encoders["image"], cfg.model.encoders["text"]
    assert image["weights"] == "r152.pth" and text["path"] == "bert"
    assert image["arch"] == "resnet152" and image["pool_regions"] == 3 and text["pooling"] == "pooler"
