from __future__ import annotations

import pytest
import torch

from msc_ray import models


def test_unknown_backbone_lists_the_valid_ones():
    with pytest.raises(ValueError) as err:
        models.build_classifier("resnet9000", 4)
    assert "resnet9000" in str(err.value) and "resnet18" in str(err.value) and "vit_b_16" in str(err.value)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "shufflenet_v2_x2_0", "alexnet", "vit_b_16"])
def test_study_head_and_any_class_count(name):
    size = models.input_size(name, 64)
    m = models.build_classifier(name, 3, image_size=size).eval()
    head = dict(m.named_modules())[models.BACKBONES[name].head]
    assert isinstance(head, torch.nn.Sequential)
    assert [type(x).__name__ for x in head] == ["Linear", "ReLU", "Dropout", "Linear"]
    assert head[0].out_features == 1024 and head[3].out_features == 3
    with torch.no_grad():
        assert m(torch.rand(2, 3, size, size)).shape == (2, 3)


def test_input_sizes_meet_architecture_limits():
    assert models.input_size("inception_v3", 64) == 75
    assert models.input_size("vit_b_16", 100) == 112  # rounded up to whole 16-px patches
    assert models.input_size("vit_b_16", 100, pretrained=True) == 224
    assert models.input_size("resnet18", 128) == 128


def test_one_channel_input_adapts_first_conv():
    m = models.build_classifier("resnet18", 2, in_channels=1).eval()
    assert m.conv1.in_channels == 1
    with torch.no_grad():
        assert m(torch.rand(1, 1, 64, 64)).shape == (1, 2)


def test_local_weights_file_is_loaded(tmp_path):
    src = models.build_classifier("mobilenet_v3_small", 4)
    from torchvision.models import get_model

    plain = get_model("mobilenet_v3_small", weights=None)
    torch.save(plain.state_dict(), tmp_path / "w.pth")
    m = models.build_classifier("mobilenet_v3_small", 4, weights_file=tmp_path / "w.pth")
    key = "features.0.0.weight"
    assert torch.equal(m.state_dict()[key], plain.state_dict()[key])
    assert not torch.equal(src.state_dict()[key], plain.state_dict()[key])
    torch.save({"nonsense": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="does not match"):
        models.build_classifier("mobilenet_v3_small", 4, weights_file=tmp_path / "bad.pth")
    assert models.resolve_pretrained("resnet18", "none") is None
    with pytest.raises(ValueError, match="no such weights file or artifact"):
        models.resolve_pretrained("resnet18", str(tmp_path / "missing.pth"))


def _classifier_artifact(dest, name: str = "compact_cnn", architecture: str | None = None, seed: int = 1):
    torch.manual_seed(seed)
    src = models.build_classifier(name, 4, image_size=64, extra_outputs=1)
    config = {"kind": "classifier", "architecture": architecture or name, "classes": list("1234")}
    models.save_artifact(dest, src.state_dict(), config)
    return src


def test_a_classifier_artifact_starts_a_new_model_with_every_weight_but_its_head(tmp_path):
    """Transfer (``--pretrained ARTIFACT``): a single-stack model's features start a multi-stack one; the
    study head (another class count, no confluence output here) and the coverage map start fresh."""
    src = _classifier_artifact(tmp_path / "art")
    weights = models.resolve_pretrained("compact_cnn", str(tmp_path / "art"))
    assert models.is_artifact(weights) and not models.imagenet_sized(weights)
    torch.manual_seed(2)
    fresh = models.build_classifier("compact_cnn", 3, image_size=128, coverage_head=True)
    torch.manual_seed(2)
    m = models.build_classifier("compact_cnn", 3, image_size=128, coverage_head=True, weights_file=weights)
    got, before, had = m.state_dict(), fresh.state_dict(), src.state_dict()
    features = [k for k in got if k.startswith("features.")]
    assert features and all(torch.equal(got[k], had[k]) for k in features)
    assert not all(torch.equal(before[k], had[k]) for k in features if before[k].is_floating_point())
    assert got["fc.3.weight"].shape == (3, 1024) and torch.equal(got["fc.3.weight"], before["fc.3.weight"])
    assert torch.equal(got["coverage.weight"], before["coverage.weight"])
    assert m(torch.rand(2, 3, 128, 128)).shape == (2, 3)


def test_an_artifact_that_does_not_fit_is_refused_in_one_line_naming_it(tmp_path):
    _classifier_artifact(tmp_path / "other", architecture="resnet18")
    with pytest.raises(ValueError, match=r"--pretrained .*other: a resnet18 model, not compact_cnn"):
        models.build_classifier("compact_cnn", 4, weights_file=tmp_path / "other")
    _classifier_artifact(tmp_path / "art")
    with pytest.raises(
        ValueError, match=r"--pretrained .*art: its weights do not fit compact_cnn here \(size mismatch"
    ):
        models.build_classifier("compact_cnn", 4, in_channels=1, weights_file=tmp_path / "art")
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="a folder, but not a model artifact"):
        models.resolve_pretrained("compact_cnn", str(tmp_path / "folder"))


def test_artifact_round_trip_local_and_s3(tmp_path, s3_server):
    m = models.build_classifier("resnet18", 4, image_size=64).eval()
    cfg = {
        "kind": "classifier",
        "architecture": "resnet18",
        "classes": ["1", "2", "3", "4"],
        "data": {"channels": 3, "size": 64},
        "dropout": 0.5,
    }
    written = models.save_artifact(tmp_path / "art", m.state_dict(), cfg)
    x = torch.rand(2, 3, 64, 64)
    s3_server.client().create_bucket(Bucket="models")
    models.save_artifact("s3://models/clf/v1", m.state_dict(), cfg)
    for src in (tmp_path / "art", "s3://models/clf/v1"):
        loaded, conf = models.load_classifier(src)
        assert conf["version"] == written["version"] and len(conf["version"]) == 12
        with torch.no_grad():
            assert torch.allclose(loaded(x), m(x))
    with pytest.raises(ValueError, match="not a model artifact"):
        models.load_classifier(tmp_path / "nothing-here")


@pytest.mark.parametrize("name", ["compact_cnn", "coverage_unet", "resnet18"])
def test_classifiers_come_in_channels_last_memory_and_compute_the_same(name):
    """The builders' layout (``models.channels_last``): 4-D weights are NHWC, the outputs match the same
    weights in NCHW, the state dict loads into an NCHW model, and the version hash ignores the layout."""
    torch.manual_seed(0)
    model = models.build_classifier(name, 4, image_size=64, extra_outputs=1).eval()
    convs = [p for p in model.parameters() if p.ndim == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    plain = models.build_classifier(name, 4, image_size=64, extra_outputs=1).eval()
    plain = plain.to(memory_format=torch.contiguous_format)
    plain.load_state_dict(model.state_dict())
    assert all(p.is_contiguous() for p in plain.parameters())
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x), rtol=1e-4, atol=1e-4)
        nhwc = x.contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(model(nhwc), plain(x), rtol=1e-4, atol=1e-4)
    assert models.state_digest(model.state_dict()) == models.state_digest(plain.state_dict())


def test_the_detector_comes_in_channels_last_memory():
    det = models.build_detector("compact_fpn", image_size=64)
    convs = [p for p in det.parameters() if p.ndim == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)


def test_the_unet_segmenter_comes_in_channels_last_memory_and_computes_the_same_maps():
    """U-Nets too (``build_segmenter``): NHWC weights, inputs turned NHWC inside, the same six maps as the
    same weights in NCHW, and a state dict saved from an NCHW model (artifacts before the change) loads."""
    torch.manual_seed(0)
    unet = models.build_segmenter("unet").eval()
    convs = [p for p in unet.parameters() if p.ndim == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    plain = models.build_segmenter("unet").to(memory_format=torch.contiguous_format).eval()
    plain.load_state_dict(unet.state_dict())
    assert all(p.is_contiguous() for p in plain.parameters())
    x = torch.rand(2, 3, 40, 56)  # not a multiple of the deepest stride: padded inside
    with torch.no_grad():
        out = unet.logits(x)
        assert out.shape == (2, 6, 40, 56)
        torch.testing.assert_close(out, plain.logits(x), rtol=1e-4, atol=1e-4)
    again = models.build_segmenter("unet").eval()
    again.load_state_dict(plain.state_dict())
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in again.parameters() if p.ndim == 4)
    with torch.no_grad():
        torch.testing.assert_close(again.logits(x), out, rtol=1e-4, atol=1e-4)
    assert models.state_digest(unet.state_dict()) == models.state_digest(plain.state_dict())


def test_the_coverage_unet_reads_its_bands_and_confluence_from_the_mean_of_its_map(monkeypatch):
    """coverage_unet has no study head: the confluence output is the logit of the map's mean probability,
    and the bands are that value's cumulative-link probabilities (they sum to 1, thresholds start at the
    band edges, in order, and the band rises with the covered fraction). Maps set by hand: a quarter of
    the pixels covered → band 0 with the confluence output at 0.25; and so on up the bands. The exported
    state keeps the map (it is the model's output), and one input channel adapts the first convolution."""
    from msc_ray import BAND_EDGES

    torch.manual_seed(0)
    m = models.build_classifier("coverage_unet", 4, image_size=64, extra_outputs=1, coverage_head=True).eval()
    assert models.supports_coverage("coverage_unet") and not models.supports_coverage("resnet18")
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        out, cov = m.forward_with_coverage(x)
        assert out.shape == (3, 5) and cov.shape == (3, 1, 32, 32)  # half the input's side
        torch.testing.assert_close(out, m(x))
        torch.testing.assert_close(torch.sigmoid(out[:, 4]), torch.sigmoid(cov).mean((1, 2, 3)), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out[:, :4].exp().sum(1), torch.ones(3), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(m.thresholds(), torch.tensor(BAND_EDGES[1:-1], dtype=torch.float32))
    bands = []
    for share in (0.25, 0.5, 0.7, 0.9):
        covered = (torch.arange(64 * 64).view(1, 1, 64, 64) < share * 64 * 64).float()
        monkeypatch.setattr(m, "coverage_logits", lambda x, covered=covered: (covered - 0.5) * 40)
        with torch.no_grad():
            o = m(x[:1])
        assert abs(float(torch.sigmoid(o[0, 4])) - share) < 1e-3, (share, o)
        bands.append(int(o[0, :4].argmax()))
    assert bands == [0, 1, 2, 3]
    three = models.build_classifier("coverage_unet", 3, in_channels=1, image_size=32)
    assert three.down[0][0].in_channels == 1
    with torch.no_grad():
        assert three.eval()(torch.rand(2, 1, 32, 32)).shape == (2, 3)
    torch.testing.assert_close(three.thresholds(), torch.tensor([1 / 3, 2 / 3]))
