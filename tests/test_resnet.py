"""ResNet-18 encoders: architecture equals torchvision's, pooling contract, init, weights loading."""
import pytest
import torch
import torchvision
from torch import nn

from mmbalance.models.encoders import create_encoder, list_encoders
from mmbalance.models.resnet import ResNet18Trunk
from mmbalance.registry import ConfigError


def test_registered():
    assert {"resnet18_audio", "resnet18_visual"} <= set(list_encoders())


def test_width64_is_torchvision_resnet18():
    """Same parameter names and shapes as torchvision's resnet18 minus fc: its weights load as-is."""
    enc = create_encoder("resnet18_visual", (3, 2, 32, 32))
    tv = {k: v.shape for k, v in torchvision.models.resnet18().state_dict().items() if not k.startswith("fc.")}
    ours = {k: v.shape for k, v in enc.trunk.state_dict().items()}
    assert ours == tv
    assert enc.out_dim == 512


def test_audio_shapes_and_width():
    enc = create_encoder("resnet18_audio", (1, 257, 188), width=16)
    assert enc.trunk.conv1.in_channels == 1 and enc.trunk.conv1.kernel_size == (7, 7)
    assert enc.trunk.conv1.stride == (2, 2)
    assert enc.out_dim == 128
    assert enc(torch.randn(2, 1, 257, 188)).shape == (2, 128)
    # [2, 2, 2, 2] BasicBlocks with widths 16/32/64/128
    assert [len(getattr(enc.trunk, f"layer{i}")) for i in range(1, 5)] == [2, 2, 2, 2]
    assert [getattr(enc.trunk, f"layer{i}")[0].conv1.out_channels for i in range(1, 5)] == [16, 32, 64, 128]


def test_visual_is_mean_over_frames_of_per_frame_features():
    """(B,3,T,H,W): each frame through the 2D trunk, mean over time and space."""
    torch.manual_seed(0)
    enc = create_encoder("resnet18_visual", (3, 3, 32, 32), width=8).eval()
    x = torch.randn(2, 3, 3, 32, 32)
    out = enc(x)
    per_frame = torch.stack([enc.trunk(x[:, :, t]).mean(dim=(2, 3)) for t in range(3)], 1).mean(1)
    assert out.shape == (2, 64)
    torch.testing.assert_close(out, per_frame, rtol=1e-5, atol=1e-5)
    # frame order does not matter (temporal mean pooling)
    torch.testing.assert_close(enc(x.flip(2)), out, rtol=1e-5, atol=1e-5)
    # a single image per sample is a one-frame clip
    torch.testing.assert_close(enc(x[:, :, 0]), enc(x[:, :, :1]), rtol=1e-5, atol=1e-5)


def test_field_initialisation():
    torch.manual_seed(0)
    enc = create_encoder("resnet18_audio", (1, 64, 64), width=64)
    for m in enc.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    # torchvision zero-inits nothing here, but kaiming fan_out gives std sqrt(2 / (out * k * k))
    w = enc.trunk.layer3[0].conv1.weight
    expected = (2.0 / (w.shape[0] * w.shape[2] * w.shape[3])) ** 0.5
    assert abs(w.std().item() - expected) / expected < 0.05


def test_weights_loaded_from_local_file(tmp_path):
    src = create_encoder("resnet18_visual", (3, 1, 32, 32), width=8)
    path = tmp_path / "w.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.trunk.state_dict().items()}}, path)
    dst = create_encoder("resnet18_visual", (3, 1, 32, 32), width=8, weights=str(path))
    for k, v in src.trunk.state_dict().items():
        assert torch.equal(dst.trunk.state_dict()[k], v)
    # 3-channel conv1 weights into a 1-channel audio trunk: averaged over channels
    tv = torchvision.models.resnet18().state_dict()
    torch.save(tv, tmp_path / "tv.pt")
    aud = create_encoder("resnet18_audio", (1, 64, 64), weights=str(tmp_path / "tv.pt"))
    torch.testing.assert_close(aud.trunk.conv1.weight, tv["conv1.weight"].mean(1, keepdim=True))


def test_weights_errors_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        create_encoder("resnet18_audio", (1, 64, 64), weights=str(tmp_path / "missing.pt"))
    torch.save(ResNet18Trunk(1, 16).state_dict(), tmp_path / "w16.pt")
    with pytest.raises(ConfigError, match="do not fit") as e:
        create_encoder("resnet18_audio", (1, 64, 64), width=32, weights=str(tmp_path / "w16.pt"))
    assert "\n" not in str(e.value)
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ConfigError, match="cannot read"):
        create_encoder("resnet18_audio", (1, 64, 64), weights=str(tmp_path / "junk.pt"))


def test_bad_input_shape():
    with pytest.raises(ConfigError, match="channels"):
        create_encoder("resnet18_visual", (3, 2, 32, 32), in_channels=1)
    with pytest.raises(ConfigError):
        create_encoder("resnet18_audio", (64, 64))
    with pytest.raises(ConfigError, match=r"^encoder 'resnet18_audio' option 'width' takes an integer >= 1, got 0$"):
        create_encoder("resnet18_audio", (1, 64, 64), width=0)
    with pytest.raises(ConfigError, match=r"^encoder 'resnet18_visual' option 'in_channels' takes an integer >= 1 "
                                          r"or null, got 0$"):
        create_encoder("resnet18_visual", (3, 2, 32, 32), in_channels=0)
    assert create_encoder("resnet18_audio", (1, 32, 32), width="8").out_dim == 64


def test_mlp_encoder_options_are_typed():
    for bad, msg in ((dict(hidden=[8, 0]), "'hidden' takes a list of integers >= 1, got [8, 0]"),
                     (dict(dropout=1.0), "'dropout' takes a number in [0, 1), got 1.0"),
                     (dict(batchnorm="some"), "'batchnorm' takes true/false, got 'some'")):
        with pytest.raises(ConfigError) as e:
            create_encoder("mlp", (5,), **bad)
        assert str(e.value) == f"encoder 'mlp' option {msg}"
    with pytest.raises(ConfigError, match=r"^encoder 'mlp' option 'hidden' takes at least one width, got \[\]$"):
        create_encoder("mlp", (5,), hidden=[])
    enc = create_encoder("mlp", (5,), hidden="16,4", dropout="0")
    assert enc.out_dim == 4 and not any(isinstance(m, torch.nn.Dropout) for m in enc.modules())
