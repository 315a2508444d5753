"""Frame-folder datasets (UCF-101 RGB + flow, NVGesture RGB/depth/flow), the 3D-ResNet encoders and
the frame preprocessing: tiny JPEG fixtures in the published layouts, sampling and augmentation
rules by hand, one-line layout errors, one epoch of joint and ARL from the CLI."""
import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from mmbalance.cli import main
from mmbalance.data import build_dataset
from mmbalance.data.framesets import (FrameClips, Stream, group_of, quantize_flow, read_nvgesture_list,
                                      run_preprocess, window_indices)
from mmbalance.models.encoders import create_encoder
from mmbalance.models.video3d import VideoResNetTrunk, adapt_stem_kernel
from mmbalance.registry import ConfigError

W, H = 20, 16


def rgb_frame(k, seed=0):
    """R encodes the frame index, G a horizontal gradient (so flips and crops show), B the clip."""
    a = np.zeros((H, W, 3), dtype=np.uint8)
    a[..., 0] = 20 + 30 * k
    a[..., 1] = np.arange(W)[None, :] * 12
    a[..., 2] = 40 * (seed % 5)
    return Image.fromarray(a)


def gray_frame(k, gradient=False):
    a = np.full((H, W), 20 + 30 * k, dtype=np.uint8)
    if gradient:
        a = np.broadcast_to((np.arange(W) * 12).astype(np.uint8), (H, W)).copy()
    return Image.fromarray(a, mode="L")


def write_frames(folder, n, make, name="frame{:06d}.jpg"):
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        make(k).save(folder / name.format(k + 1), quality=95)


def make_ucf(root, classes=("Alpha", "Beta"), train_groups=(8, 9, 10), test_groups=(1,), clips=2, rgb=4, flow=6,
             missing=None):
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "classInd.txt").write_text("".join(f"{i + 1} {c}\n" for i, c in enumerate(classes)))
    lines = {"train": [], "test": []}
    for split, groups in (("train", train_groups), ("test", test_groups)):
        for ci, c in enumerate(classes):
            for g in groups:
                for k in range(1, clips + 1):
                    vid = f"v_{c}_g{g:02d}_c{k:02d}"
                    lines[split].append(f"{c}/{vid}.avi" + (f" {ci + 1}" if split == "train" else ""))
                    if vid == missing:
                        continue
                    seed = len(lines[split])
                    write_frames(root / "rgb" / vid, rgb, lambda j, s=seed: rgb_frame(j, s), "frame_{:05d}.jpg")
                    write_frames(root / "flow" / "u" / vid, flow, lambda j: gray_frame(j))
                    write_frames(root / "flow" / "v" / vid, flow, lambda j: gray_frame(j, gradient=True))
    (root / "trainlist01.txt").write_text("\n".join(lines["train"]) + "\n")
    (root / "testlist01.txt").write_text("\n".join(lines["test"]) + "\n")
    return lines


def make_nv(root, classes=2, train_subjects=(1, 2, 3), test_subjects=(4,), frames=6):
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for split, subjects in (("train", train_subjects), ("test", test_subjects)):
        lines = []
        for c in range(1, classes + 1):
            for s in subjects:
                cid = f"class_{c:02d}/subject{s}_r0"
                lines.append(f"path:./Video_data/{cid} depth:sk_depth:10:{10 + frames} color:sk_color:10:{10 + frames} "
                             f"duo_left:duo_left:12:{12 + frames} label:{c}")
                base = root / "frames" / cid
                write_frames(base / "rgb", frames, lambda j: rgb_frame(j), "{:05d}.jpg")
                write_frames(base / "depth", frames, lambda j: gray_frame(j), "{:05d}.jpg")
                write_frames(base / "flow" / "u", frames, lambda j: gray_frame(j), "{:05d}.jpg")
                write_frames(base / "flow" / "v", frames, lambda j: gray_frame(j, gradient=True), "{:05d}.jpg")
        (root / f"nvgesture_{split}_correct_cvpr2016.lst").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def ucf_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ucf")
    make_ucf(root)
    return root


@pytest.fixture(scope="module")
def nv_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("nv")
    make_nv(root)
    return root


def _frame_index(channel: torch.Tensor) -> float:
    """The frame index k encoded as 20 + 30 k in an image channel (values in [0, 1])."""
    return (float(channel.mean()) * 255 - 20) / 30


# ----------------------------------------------------------------------------- UCF-101

def test_ucf101_contract_shapes_and_group_split(ucf_root):
    d = build_dataset("ucf101", root=str(ucf_root), num_frames=2, image_size=12)
    assert d.modalities == ["rgb", "flow"] and d.num_classes == 2 and d.class_names == ["Alpha", "Beta"]
    assert d.input_shapes == {"rgb": (3, 2, 12, 12), "flow": (2, 2, 12, 12)}
    assert d.default_encoders == {"rgb": "resnet18_visual", "flow": "resnet18_visual"}
    s = d.test[0]
    assert set(s) == {"inputs", "label", "index", "present"}
    assert s["inputs"]["rgb"].shape == (3, 2, 12, 12) and s["inputs"]["flow"].shape == (2, 2, 12, 12)
    assert d.test.ids[0] == "v_Alpha_g01_c01" and int(s["label"]) == 0
    assert int(d.test[len(d.test) - 1]["label"]) == 1
    # validation = whole groups of the training list (one of three here), never the test list
    groups = [{group_of(c) for c in ds.ids} for ds in (d.train, d.val)]
    assert groups[1] and not (groups[0] & groups[1]) and len(groups[1]) == 1
    assert len(d.train) + len(d.val) == 12 and len(d.test) == 4
    assert set(d.test.ids).isdisjoint(d.train.ids + d.val.ids)
    again = build_dataset("ucf101", root=str(ucf_root), num_frames=2, image_size=12)
    assert again.val.ids == d.val.ids  # fixed split
    only = build_dataset("ucf101", root=str(ucf_root), modalities=["flow"], image_size=12)
    assert only.modalities == ["flow"] and only.input_shapes == {"flow": (2, 3, 12, 12)}


def test_ucf101_eval_frames_are_segment_middles_train_is_random(ucf_root):
    from torchvision.transforms import functional as TF

    d = build_dataset("ucf101", root=str(ucf_root), num_frames=3, image_size=W)
    x = d.test[0]["inputs"]
    # rgb: 4 frames, 3 segments -> middles 0, 1, 2; flow: 6 frames -> 0, 2, 4 (1-based files +1)
    assert [round(_frame_index(x["rgb"][0, t] * 0.229 + 0.485)) for t in range(3)] == [0, 1, 2]
    assert [round(_frame_index(x["flow"][0, t])) for t in range(3)] == [0, 2, 4]
    vid = d.test.ids[0]
    img = Image.open(ucf_root / "flow" / "v" / vid / "frame000003.jpg").convert("L").resize((W, W), Image.BILINEAR)
    torch.testing.assert_close(x["flow"][1, 1], TF.to_tensor(img)[0])  # v channel, exactly as loaded
    torch.manual_seed(0)  # a random frame per segment in training (the R channel's mean survives flips)
    seen = {tuple(round(_frame_index(d.train[0]["inputs"]["rgb"][0, t] * 0.229 + 0.485)) for t in range(3))
            for _ in range(30)}
    assert seen == {(0, 1, 2), (0, 1, 3)}  # 4 frames in 3 segments: [0], [1], [2, 3]
    te = d.train_eval
    assert torch.equal(te[0]["inputs"]["rgb"], te[0]["inputs"]["rgb"])  # deterministic evaluation transforms


def test_flip_is_one_per_clip_and_negates_horizontal_flow(tmp_path):
    root = tmp_path
    write_frames(root / "rgb" / "c", 2, lambda j: rgb_frame(0), "{:05d}.jpg")  # identical frames
    write_frames(root / "u" / "c", 2, lambda j: gray_frame(0, gradient=True), "{:05d}.jpg")
    write_frames(root / "v" / "c", 2, lambda j: gray_frame(0, gradient=True), "{:05d}.jpg")
    streams = {"rgb": Stream(("rgb/{id}",), imagenet=True), "flow": Stream(("u/{id}", "v/{id}"), gray=True, negate_on_flip=0)}
    ref = FrameClips(root, ["c"], [0], streams, 2, train=False, image_size=W)[0]["inputs"]
    train = FrameClips(root, ["c"], [0], streams, 2, train=True, image_size=W)
    torch.manual_seed(0)
    flipped = plain = 0
    for _ in range(20):
        x = train[0]["inputs"]
        if torch.equal(x["rgb"], ref["rgb"]):
            plain += 1
            assert torch.equal(x["flow"], ref["flow"])
        else:
            flipped += 1
            torch.testing.assert_close(x["rgb"], ref["rgb"].flip(-1))  # every frame of every stream
            torch.testing.assert_close(x["flow"][0], 1.0 - ref["flow"][0].flip(-1))  # u negated
            torch.testing.assert_close(x["flow"][1], ref["flow"][1].flip(-1))  # v mirrored only
    assert flipped and plain


def test_missing_folders_and_wrong_layout_are_one_line(tmp_path, ucf_root):
    make_ucf(tmp_path / "m", missing="v_Beta_g09_c02")
    d = build_dataset("ucf101", root=str(tmp_path / "m"), image_size=12)
    assert d.info["dropped"] == {"train": 1, "test": 0} and len(d.train) + len(d.val) == 11
    with pytest.raises(ConfigError, match=r"lacks classInd.txt, trainlist01.txt, testlist01.txt; expected classInd.txt"):
        build_dataset("ucf101", root=str(tmp_path))
    with pytest.raises(ConfigError, match=r"lacks trainlist02.txt, testlist02.txt"):
        build_dataset("ucf101", root=str(ucf_root), split=2)
    with pytest.raises(ConfigError, match=r"no listed clip has all its frame folders .* \(e.g. frames_rgb/v_Alpha_g08_c01 "
                                          r"is missing\); expected .*frames_rgb/<video>/\*.jpg"):
        build_dataset("ucf101", root=str(ucf_root), rgb_dir="frames_rgb")
    with pytest.raises(ConfigError, match="needs the option root"):
        build_dataset("nvgesture")
    with pytest.raises(ConfigError, match=r"lacks nvgesture_train_correct_cvpr2016.lst, nvgesture_test_correct_cvpr2016.lst; "
                                          r"expected the lists"):
        build_dataset("nvgesture", root=str(ucf_root))
    with pytest.raises(ConfigError, match="ucf101 has modalities rgb, flow"):
        build_dataset("ucf101", root=str(ucf_root), modalities=["depth"])


# ----------------------------------------------------------------------------- NVGesture

def test_nvgesture_list_parsing_and_window(tmp_path):
    p = tmp_path / "l.lst"
    p.write_text("path:./Video_data/class_03/subject13_r1 depth:sk_depth:138:218 color:sk_color:140:220 "
                 "duo_left:duo_left:161:253 label:3\n\n")
    (e,) = read_nvgesture_list(p)
    assert e["id"] == "class_03/subject13_r1" and e["label"] == 2
    assert e["color"] == ("sk_color", 140, 220) and e["depth"] == ("sk_depth", 138, 218)
    p.write_text("depth:sk_depth:1:2\n")
    with pytest.raises(ConfigError, match="line 1 of l.lst has no path"):
        read_nvgesture_list(p)
    assert window_indices(80, 64, train=False) == list(range(8, 72))  # central window
    assert window_indices(3, 5, train=False) == [0, 1, 2, 2, 2]  # short clip repeats its last frame
    g = torch.Generator().manual_seed(0)
    starts = {window_indices(80, 64, True, g)[0] for _ in range(200)}
    assert starts == set(range(17))  # IGM: random start in [0, 80 - 64]


def test_nvgesture_streams_share_window_and_crop(nv_root):
    d = build_dataset("nvgesture", root=str(nv_root), num_frames=3, image_size=16, resize=W)
    assert d.modalities == ["rgb", "depth", "flow"] and d.num_classes == 2
    assert d.input_shapes == {"rgb": (3, 3, 16, 16), "depth": (1, 3, 16, 16), "flow": (2, 3, 16, 16)}
    assert d.default_encoders == {"rgb": "r3d_18", "depth": "r3d_18", "flow": "r3d_18"}
    subjects = [{i.split("/")[1] for i in ds.ids} for ds in (d.train, d.val, d.test)]
    assert subjects[1] and not (subjects[0] & subjects[1]) and subjects[2] == {"subject4_r0"}
    x = d.test[0]["inputs"]  # 6 frames, central 3 -> 1, 2, 3; central crop offset 2
    assert [round(_frame_index(x["depth"][0, t])) for t in range(3)] == [1, 2, 3]
    assert [round(_frame_index(x["flow"][0, t])) for t in range(3)] == [1, 2, 3]
    assert abs(float(x["flow"][1, 0, 0, 0]) * 255 - 2 * 12) < 3  # v gradient starts at column 2
    torch.manual_seed(1)
    crops, starts = set(), set()
    for _ in range(25):
        x = d.train[0]["inputs"]
        idx = {m: [round(_frame_index(x[m][0, t] if m != "rgb" else x[m][0, t] * 0.229 + 0.485)) for t in range(3)]
               for m in ("rgb", "depth", "flow")}
        assert idx["rgb"] == idx["depth"] == idx["flow"]  # one window for every stream
        assert idx["depth"] == list(range(idx["depth"][0], idx["depth"][0] + 3))  # consecutive
        left_v = float(x["flow"][1, 0, 0, 0]) * 255 / 12
        left_g = (float(x["rgb"][1, 0, 0, 0]) * 0.224 + 0.456) * 255 / 12
        assert abs(left_v - left_g) < 0.3  # one crop for every stream
        crops.add(round(left_v))
        starts.add(idx["depth"][0])
    assert len(crops) > 1 and starts == {0, 1, 2, 3}


# ----------------------------------------------------------------------------- 3D encoders

def test_video_resnets_are_torchvisions_and_load_local_weights(tmp_path):
    torch.manual_seed(0)
    with torch.device("meta"):  # shapes only: no memory, no init cost
        for arch in ("r3d_18", "r2plus1d_18", "mc3_18"):
            tv = {k: v.shape for k, v in getattr(torchvision.models.video, arch)().state_dict().items()
                  if not k.startswith("fc.")}
            assert {k: v.shape for k, v in VideoResNetTrunk(arch).state_dict().items()} == tv
    ref = torchvision.models.video.r3d_18().eval()
    torch.save(ref.state_dict(), tmp_path / "r3d.pt")
    enc = create_encoder("r3d_18", (3, 4, 32, 32), weights=str(tmp_path / "r3d.pt")).eval()
    ref.fc = torch.nn.Identity()
    x = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(enc(x), ref(x))  # same network, same weights: same features
    flow = create_encoder("r3d_18", (2, 4, 32, 32), weights=str(tmp_path / "r3d.pt"))
    w = ref.stem[0].weight
    torch.testing.assert_close(flow.trunk.stem[0].weight, w.mean(1, keepdim=True).repeat(1, 2, 1, 1, 1))
    assert adapt_stem_kernel(w, 3) is w
    small = create_encoder("r2plus1d_18", (1, 4, 16, 16), width=4)
    assert small.out_dim == 32 and small(torch.randn(2, 1, 4, 16, 16)).shape == (2, 32)
    with pytest.raises(ConfigError, match="encoder weights file not found"):
        create_encoder("r3d_18", (3, 4, 16, 16), weights=str(tmp_path / "nope.pt"))
    with pytest.raises(ConfigError, match=r"do not fit this r2plus1d_18 \(check the arch and width\)"):
        create_encoder("r2plus1d_18", (3, 4, 16, 16), weights=str(tmp_path / "r3d.pt"))
    with pytest.raises(ConfigError, match=r"expects a clip \(channels, frames, height, width\)"):
        create_encoder("r3d_18", (3, 16, 16))
    with pytest.raises(ConfigError, match="has in_channels=3 but the input has 2 channels"):
        create_encoder("r3d_18", (2, 4, 16, 16), in_channels=3)


# ----------------------------------------------------------------------------- CLI

@pytest.mark.parametrize("method", ["joint", "arl"])
def test_one_epoch_on_ucf101_from_the_cli(tmp_path, ucf_root, method):
    out = tmp_path / "run"
    args = ["-q", "train", "--dataset", "ucf101", "--dataset.root", str(ucf_root), "--dataset.num_frames", "2",
            "--dataset.image_size", "16", "--model.encoder_options.width", "4", "--method", method, "--epochs", "1",
            "--batch-size", "4", "--train.progress", "off", "--train.probe", "false", "--output-dir", str(out)]
    if method == "arl":
        args += ["--method.warmup_epochs", "0"]
    assert main(args) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["dataset"] == "ucf101" and set(res["test"]["per_modality"]) == {"rgb", "flow"}


@pytest.mark.parametrize("method", ["joint", "arl"])
def test_one_epoch_on_nvgesture_from_the_cli(tmp_path, nv_root, method):
    out = tmp_path / "run"
    args = ["-q", "train", "--dataset", "nvgesture", "--dataset.root", str(nv_root), "--dataset.num_frames", "4",
            "--dataset.image_size", "16", "--dataset.resize", "20", "--model.encoder_options.width", "4",
            "--method", method, "--epochs", "1", "--batch-size", "4", "--train.progress", "off",
            "--train.probe", "false", "--output-dir", str(out)]
    if method == "arl":
        args += ["--method.warmup_epochs", "0"]
    assert main(args) == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["test"]["per_modality"]) == {"rgb", "depth", "flow"}


# ----------------------------------------------------------------------------- preprocessing

def _args(dataset, source, output, **kw):
    ns = dict(dataset=dataset, source=str(source), output=str(output), workers=1, fps=1.0, short_side=None,
              limit=None, no_progress=True, flow="none", flow_weights=None, flow_bound=20.0, classes=None)
    ns.update(kw)
    return argparse.Namespace(**ns)


def test_quantize_flow_like_tvl1_releases():
    assert quantize_flow(np.array([-20.0, -10.0, 0.0, 20.0, 25.0])).tolist() == [0, 64, 128, 255, 255]


def test_preprocess_ucf101_with_raft_flow(tmp_path):
    from av_fixtures import write_corrupt, write_video

    raw = tmp_path / "raw"
    for c in ("Alpha", "Beta"):
        for g in (1, 8, 10):
            write_video(raw / "UCF-101" / c / f"v_{c}_g{g:02d}_c01.avi", 1.2, audio=False, seed=g)
    write_corrupt(raw / "UCF-101" / "Beta" / "v_Beta_g09_c01.avi")
    lists = raw / "ucfTrainTestlist"
    lists.mkdir()
    (lists / "classInd.txt").write_text("1 Alpha\n2 Beta\n")
    (lists / "trainlist01.txt").write_text("Alpha/v_Alpha_g08_c01.avi 1\nBeta/v_Beta_g08_c01.avi 2\n"
                                           "Beta/v_Beta_g09_c01.avi 2\nAlpha/v_Alpha_g10_c01.avi 1\n"
                                           "Beta/v_Beta_g10_c01.avi 2\n")
    (lists / "testlist01.txt").write_text("Alpha/v_Alpha_g01_c01.avi\nBeta/v_Beta_g01_c01.avi\n")
    weights = tmp_path / "raft.pt"
    torch.manual_seed(0)
    torch.save(torchvision.models.optical_flow.raft_small().state_dict(), weights)
    with pytest.raises(ConfigError, match="needs --flow-weights FILE"):
        run_preprocess(_args("ucf101", raw, tmp_path / "out", flow="raft_small"))
    out = tmp_path / "out"
    assert run_preprocess(_args("ucf101", raw, out, flow="raft_small", flow_weights=str(weights))) == 0
    for vid in ("v_Alpha_g08_c01", "v_Beta_g01_c01"):
        names = sorted(p.name for p in (out / "rgb" / vid).iterdir())
        assert names == ["00001.jpg", "00002.jpg"]  # 1.2 s at 1 fps
        for sub in ("u", "v"):
            assert sorted(p.name for p in (out / "flow" / sub / vid).iterdir()) == names
            with Image.open(out / "flow" / sub / vid / "00001.jpg") as im:
                assert im.mode == "L" and im.size == (32, 24)
    skipped = (out / "skipped.txt").read_text().splitlines()
    assert len(skipped) == 1 and skipped[0].startswith("v_Beta_g09_c01\t")
    assert (out / "classInd.txt").is_file() and json.loads((out / "meta.json").read_text())["flow"] == "raft_small"
    d = build_dataset("ucf101", root=str(out), image_size=16, num_frames=2, val_fraction=0.5)
    assert d.info["dropped"]["train"] == 1 and len(d.test) == 2 and len(d.train) == len(d.val) == 2
    assert d.test[0]["inputs"]["flow"].shape == (2, 2, 16, 16)
    # a rerun finds every clip done
    assert run_preprocess(_args("ucf101", raw, out, flow="raft_small", flow_weights=str(weights))) == 0


def test_preprocess_nvgesture_frames_of_the_annotated_range(tmp_path):
    from av_fixtures import write_video

    raw = tmp_path / "raw"
    lines = {"train": [], "test": []}
    for split, subjects in (("train", (1, 2)), ("test", (3,))):
        for c in (1, 2):
            for s in subjects:
                cid = f"class_{c:02d}/subject{s}_r0"
                write_video(raw / "Video_data" / cid / "sk_color.avi", 1.2, audio=False, seed=s)
                write_video(raw / "Video_data" / cid / "sk_depth.avi", 1.2, audio=False, seed=s + 10)
                lines[split].append(f"path:./Video_data/{cid} depth:sk_depth:3:9 color:sk_color:2:7 label:{c}")
    for split in lines:
        (raw / f"nvgesture_{split}_correct_cvpr2016.lst").write_text("\n".join(lines[split]) + "\n")
    out = tmp_path / "out"
    assert run_preprocess(_args("nvgesture", raw, out)) == 0
    base = out / "frames" / "class_02" / "subject3_r0"
    assert len(list((base / "rgb").iterdir())) == 5 and len(list((base / "depth").iterdir())) == 6
    with Image.open(base / "depth" / "00001.jpg") as im:
        assert im.mode == "L"
    assert not (base / "flow").exists()
    d = build_dataset("nvgesture", root=str(out), modalities=["rgb", "depth"], num_frames=4, image_size=16, resize=20)
    assert len(d.test) == 2 and d.test[0]["inputs"]["depth"].shape == (1, 4, 16, 16)
    with pytest.raises(ConfigError, match=r"flow/u is missing\); expected the lists"):
        build_dataset("nvgesture", root=str(out), image_size=16, resize=20)
    with pytest.raises(ConfigError, match="has no nvgesture_\\*.lst list"):
        run_preprocess(_args("nvgesture", tmp_path / "out" / "frames", tmp_path / "o2"))


def test_preprocess_command_dispatches_frame_datasets(tmp_path):
    from mmbalance.data import preprocess

    if "ucf101" not in preprocess.DATASETS:
        pytest.skip("mmbalance preprocess does not dispatch ucf101 yet (lines to add: see framesets.py report)")
    raw = tmp_path / "raw"
    (raw / "ucfTrainTestlist").mkdir(parents=True)
    from av_fixtures import write_video

    write_video(raw / "UCF-101" / "A" / "v_A_g01_c01.avi", 1.2, audio=False)
    (raw / "ucfTrainTestlist" / "classInd.txt").write_text("1 A\n")
    (raw / "ucfTrainTestlist" / "trainlist01.txt").write_text("A/v_A_g01_c01.avi 1\n")
    (raw / "ucfTrainTestlist" / "testlist01.txt").write_text("A/v_A_g01_c01.avi\n")
    assert main(["preprocess", "ucf101", "--source", str(raw), "--output", str(tmp_path / "out"), "--workers", "1",
                 "--no-progress"]) == 0
    assert (tmp_path / "out" / "rgb" / "v_A_g01_c01" / "00001.jpg").is_file()


@pytest.mark.parametrize("ds", ["ucf101", "nvgesture"])
def test_shipped_configs_build_on_the_fixture_layouts(ds, ucf_root, nv_root):
    from mmbalance.config import load_config

    root = ucf_root if ds == "ucf101" else nv_root
    paths = sorted((Path(__file__).resolve().parents[1] / "configs" / ds).glob("*.yaml"))
    assert {p.stem for p in paths} >= {"base", "joint", "arl"}
    for p in paths:
        cfg = load_config(p, {"dataset.root": str(root)})
        d = build_dataset(cfg.dataset.name, **cfg.dataset.options)
        assert d.num_classes == 2 and d.input_shapes[d.modalities[0]][1:] == ((64, 224, 224) if ds == "nvgesture"
                                                                             else (3, 224, 224))


def test_mie_three_modality_recipe_runs(tmp_path, nv_root):
    """configs/nvgesture/mie.yaml (MIE's three-modality experiment) on the fixture, shrunk."""
    cfg = Path(__file__).resolve().parents[1] / "configs" / "nvgesture" / "mie.yaml"
    out = tmp_path / "run"
    assert main(["-q", "train", "--config", str(cfg), "--dataset.root", str(nv_root), "--dataset.num_frames", "4",
                 "--dataset.image_size", "16", "--dataset.resize", "20", "--model.encoder_options.width", "4",
                 "--epochs", "1", "--batch-size", "4", "--train.progress", "off", "--train.probe", "false",
                 "--output-dir", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["method"] == "mie" and set(res["test"]["per_modality"]) == {"rgb", "depth", "flow"}
