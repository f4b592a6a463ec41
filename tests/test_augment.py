from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from msc_ray import augment
from msc_ray.config import DataConfig

BOX = [20.0, 10.0, 40.0, 30.0]


def _sample():
    img = torch.zeros(1, 64, 64)
    yy, xx = torch.meshgrid(torch.arange(64) + 0.5, torch.arange(64) + 0.5, indexing="ij")
    img[0][((xx - 30) / 10) ** 2 + ((yy - 20) / 10) ** 2 <= 1] = 1.0  # a round cell that BOX encloses exactly
    return {
        "image": tv_tensors.Image(img),
        "boxes": tv_tensors.BoundingBoxes(torch.tensor([BOX]), format="XYXY", canvas_size=(64, 64)),
        "labels": torch.tensor([1]),
    }


def _object_box(img: torch.Tensor) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(img[0].numpy() > 0.5)
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


@pytest.mark.parametrize("step", augment.geometric(DataConfig(size=64, channels=1)), ids=lambda s: type(s).__name__)
@pytest.mark.parametrize("seed", range(6))
def test_geometric_steps_keep_the_box_on_the_object(step, seed):
    out = augment.apply(v2.Compose([step]), _sample(), seed)
    x1, y1, x2, y2 = out["boxes"][0].tolist()
    ox1, oy1, ox2, oy2 = _object_box(out["image"])
    tol = 1.5  # bilinear resampling and the crop's resize move an edge by about a pixel
    assert x1 - tol <= ox1 and y1 - tol <= oy1 and ox2 <= x2 + tol and oy2 <= y2 + tol
    # and it is still the object's own box: a rotated round cell's box does not grow
    assert abs((x2 - x1) - (ox2 - ox1)) <= 2 * tol and abs((y2 - y1) - (oy2 - oy1)) <= 2 * tol


def test_rotation_really_rotates_and_flips_really_flip():
    moved = set()
    for seed in range(12):
        for step in augment.geometric(DataConfig(size=64, channels=1, rotation=15)):
            out = augment.apply(v2.Compose([step]), _sample(), seed)
            moved.add(tuple(round(v) for v in out["boxes"][0].tolist()))
    assert len(moved) > 6


def test_rotation_keeps_half_the_samples_pixel_exact():
    """A small angle resamples (smooths) the image; scored images never are. Half the samples must be
    exact quarter turns, so the model also trains on images as sharp as those it scores."""
    img = tv_tensors.Image(torch.rand(1, 32, 32))
    turns = [torch.rot90(img, k, dims=(-2, -1)) for k in range(4)]
    exact = 0
    for seed in range(200):
        out = augment.apply(v2.Compose([augment.RotateCrop(15.0)]), {"image": img}, seed)["image"]
        exact += any(torch.equal(out.as_subclass(torch.Tensor), t.as_subclass(torch.Tensor)) for t in turns)
    assert 70 <= exact <= 130  # binomial(200, 0.5): outside this in fewer than 1e-4 of seeds sets
    # and the resampled ones are smoother, which is why they cannot be all of them
    tilted = augment.apply(v2.Compose([augment.RotateCrop(15.0, p_small=1.0)]), {"image": img}, 0)["image"]
    assert tilted.diff(dim=-1).abs().mean() < 0.8 * img.diff(dim=-1).abs().mean()


@pytest.mark.parametrize(
    "job, share",
    [
        ("detect.DetectJobConfig", 0.5),  # the detector: half the samples stay sharp, like the classifier
        ("segment.SegmentJobConfig", 1.0),  # the segmenter: the small angle in every sample
    ],
)
def test_each_model_trains_with_its_own_share_of_small_angles(job, share):
    import importlib

    module, name = job.split(".")
    cfg = getattr(importlib.import_module(f"msc_ray.{module}"), name)(manifest="m.parquet", out="o").data_config()
    assert cfg.tilt_share == share
    rotate = augment.geometric(cfg)[0]
    assert isinstance(rotate, augment.RotateCrop) and rotate.p_small == share
    with pytest.raises(ValueError, match="tilt_share"):
        DataConfig(tilt_share=1.5)


def test_full_recipe_is_reproducible_per_seed_epoch_image():
    cfg = DataConfig(size=48, channels=1)
    tf = augment.build(cfg, train=True, boxes=True)
    s1 = augment.sample_seed(0, 3, "sstack/1/a.png")
    assert s1 == augment.sample_seed(0, 3, "sstack/1/a.png")
    a, b = augment.apply(tf, _sample(), s1), augment.apply(tf, _sample(), s1)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["boxes"], b["boxes"])
    outs = {
        augment.apply(tf, _sample(), augment.sample_seed(0, e, "sstack/1/a.png"))["image"].sum().item()
        for e in range(6)
    }
    assert len(outs) > 3
    assert a["image"].shape == (1, 48, 48)


def test_apply_draws_from_the_seed_alone_and_restores_the_generator():
    """apply seeds only the CPU generator (not every accelerator backend): its draws are the ones
    torch.manual_seed(seed) gives, and the global generator continues as if apply never ran."""
    tf = augment.build(DataConfig(size=48, channels=1), train=True, boxes=True)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    out = augment.apply(tf, _sample(), 7)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(7)
    ref = tf(_sample())
    assert torch.equal(out["image"], ref["image"]) and torch.equal(out["boxes"], ref["boxes"])


def test_validation_recipe_is_deterministic_and_has_no_augmentation():
    cfg = DataConfig(size=64, channels=1)
    tf = augment.build(cfg, train=False)
    a = augment.apply(tf, {"image": _sample()["image"]}, 1)["image"]
    b = augment.apply(tf, {"image": _sample()["image"]}, 2)["image"]
    assert torch.equal(a, b)
    # only normalisation: (x - 0.5) / 0.25
    assert torch.allclose(a, (_sample()["image"] - 0.5) / 0.25)


def test_photometric_steps_change_intensity_not_geometry():
    img = torch.rand(1, 32, 32) * 0.5 + 0.25
    sharp = augment.EdgeSharpen()
    out = augment.apply(v2.Compose([sharp]), {"image": tv_tensors.Image(img)}, 0)["image"]
    assert out.shape == img.shape and not torch.equal(out, img) and 0 <= out.min() and out.max() <= 1
    stretch = augment.apply(v2.Compose([v2.RandomAutocontrast(p=1.0)]), {"image": tv_tensors.Image(img)}, 0)["image"]
    assert stretch.min() == pytest.approx(0.0, abs=1e-6) and stretch.max() == pytest.approx(1.0, abs=1e-6)


def test_equalize_for_multistack():
    cfg = DataConfig(size=32, channels=1, equalize=True, mean=(0.0,), std=(1.0,))
    img = tv_tensors.Image(torch.rand(1, 32, 32) * 0.2 + 0.4)  # low contrast
    out = augment.apply(augment.build(cfg, train=False), {"image": img}, 0)["image"]
    assert out.max() - out.min() > 0.8


# --- the batched recipe (GPU trials) ----------------------------------------------------------------


def _draws(b: int, **at) -> torch.Tensor:
    """Draws that switch every step off (no tilt, no flip, no jitter, no blur, no enhancement), with
    the named columns set."""
    u = torch.full((b, augment.N_DRAWS), 0.999, dtype=torch.float64)
    u[:, 0] = 0.1  # no quarter turn
    names = {"quarter": 0, "tilt": 1, "angle": 2, "hflip": 3, "vflip": 4, "jitter": 5, "bright": 6, "contrast": 7}
    names.update({"order": 8, "blur": 9, "sigma": 10, "enhance": 11, "sharpen": 12, "amount": 13})
    for k, v in at.items():
        u[:, names[k]] = v
    return u


def _smooth_image(size: int = 64, c: int = 1) -> torch.Tensor:
    """A smooth pattern of amplitude 0.4 around 0.5, each channel its own."""
    yy, xx = torch.meshgrid(
        torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij"
    )
    chans = [0.5 + 0.4 * torch.sin(xx / (5 + i)) * torch.cos(yy / (7 - i)) for i in range(c)]
    return torch.stack(chans)[None]


def test_batched_recipe_turns_and_flips_exactly_and_moves_the_covered_map_along():
    ba = augment.BatchAugment(DataConfig(size=16))
    x = torch.rand(8, 1, 16, 16)
    cov = (torch.rand(8, 1, 16, 16) > 0.5).float()
    quarter = torch.arange(8) % 4
    hflip, vflip = (torch.arange(8) // 4) % 2 == 1, torch.arange(8) % 3 == 0
    u = _draws(8, quarter=(quarter + 0.5) / 4, hflip=torch.where(hflip, 0.1, 0.9), vflip=torch.where(vflip, 0.1, 0.9))
    y, ycov = ba.apply(x, u, cov)
    for i in range(8):
        want = v2.functional.rotate(x[i], 90.0 * int(quarter[i]))
        want_cov = v2.functional.rotate(cov[i], 90.0 * int(quarter[i]))
        if hflip[i]:
            want, want_cov = torch.flip(want, (2,)), torch.flip(want_cov, (2,))
        if vflip[i]:
            want, want_cov = torch.flip(want, (1,)), torch.flip(want_cov, (1,))
        assert torch.allclose(y[i], want, atol=1e-5), i  # whole pixels moved: float rounding only
        assert torch.equal(ycov[i], want_cov), i


def test_batched_tilt_matches_the_per_image_rotate_and_crop():
    """A small angle with the fill-free crop: one resampling here, two (rotate, then crop and resize) on
    the per-image path; on a smooth image they agree to a fraction of its contrast, and no corner is fill."""
    ba = augment.BatchAugment(DataConfig(size=64))
    x = _smooth_image()
    for angle in (-11.0, 4.0, 14.0):
        y, _ = ba.apply(x, _draws(1, tilt=0.0, angle=(angle / 15 + 1) / 2))
        want = augment.RotateCrop().transform(x, {"angle": angle, "small": angle})
        other = augment.RotateCrop().transform(x, {"angle": -angle, "small": -angle})
        # against an amplitude of 0.4; the per-image crop's offset is rounded to whole pixels
        assert (y - want).abs().mean() < 0.03 and (y - other).abs().mean() > 2 * (y - want).abs().mean(), angle
        assert not torch.allclose(y, x, atol=1e-3)
    ones, _ = ba.apply(torch.ones(1, 1, 64, 64), _draws(1, tilt=0.0, angle=0.0))  # 15°: corners stay inside
    assert torch.allclose(ones, torch.ones_like(ones))


def test_batched_photometric_steps_equal_torchvisions_with_the_same_parameters():
    ba = augment.BatchAugment(DataConfig(size=64))
    x = _smooth_image(c=3)
    F = v2.functional
    y, _ = ba.apply(x, _draws(1, jitter=0.0, bright=0.8, contrast=0.8, order=0.0))  # brightness 1.15, contrast 1.15
    want = F.adjust_contrast(F.adjust_brightness(x, 1.15), 1.15)
    assert torch.allclose(y, want, atol=1e-5)
    y, _ = ba.apply(x, _draws(1, jitter=0.0, bright=0.0, contrast=1.0 - 1e-9, order=0.9))  # contrast first
    assert torch.allclose(y, F.adjust_brightness(F.adjust_contrast(x, 1.25), 0.75), atol=1e-5)
    y, _ = ba.apply(x, _draws(1, blur=0.0, sigma=0.5))  # sigma 0.8
    assert torch.allclose(y, F.gaussian_blur(x, [5, 5], [0.8, 0.8]), atol=1e-5)
    y, _ = ba.apply(x, _draws(1, enhance=0.0, sharpen=0.0, amount=0.25))  # EdgeSharpen, amount 0.75
    assert torch.allclose(y, augment.EdgeSharpen().transform(x, {"amount": 0.75}), atol=1e-5)
    y, _ = ba.apply(x * 0.5 + 0.2, _draws(1, enhance=0.0, sharpen=0.9))  # autocontrast
    assert torch.allclose(y, F.autocontrast(x * 0.5 + 0.2), atol=1e-5)
    assert y.amin() == 0.0 and abs(float(y.amax()) - 1.0) < 1e-6
    off, _ = ba.apply(x, _draws(1))
    assert torch.allclose(off, x, atol=1e-5)


def test_batched_draws_are_per_image_and_follow_the_recipes_probabilities():
    cfg = DataConfig(size=32, seed=5)
    ba = augment.BatchAugment(cfg)
    keys = [f"img{i}.png" for i in range(4000)]
    u = ba.params(keys, epoch=2).numpy()
    assert np.array_equal(u[7], ba.params([keys[7]], epoch=2).numpy()[0])  # whatever the batch
    assert not np.array_equal(u[7], ba.params([keys[7]], epoch=3).numpy()[0])  # a new epoch, new draws
    theta = ba.geometry(torch.from_numpy(u), 32)
    turned = torch.isclose(theta[:, 0, 0].abs(), torch.tensor(0.0, dtype=torch.float64), atol=1e-9)
    shares = {
        "tilt": float(np.mean(u[:, 1] < cfg.tilt_share)),
        "quarter turn by 90 or 270": float(turned.double().mean()),
        "jitter": float(np.mean(u[:, 5] < 0.5)),
        "blur": float(np.mean(u[:, 9] < 0.3)),
        "sharpen": float(np.mean((u[:, 11] < 0.5) & (u[:, 12] < 0.5))),
    }
    want = {"tilt": 0.5, "quarter turn by 90 or 270": 0.25, "jitter": 0.5, "blur": 0.3, "sharpen": 0.25}
    for k, v in want.items():
        assert abs(shares[k] - v) < 0.03, (k, shares[k])
    x = torch.rand(2, 1, 32, 32)
    a, _ = ba(x, keys[:2], epoch=0)
    b, _ = ba(x, keys[:2], epoch=0)
    assert torch.equal(a, b) and not torch.allclose(a, x)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batched_recipe_on_the_gpu_equals_the_cpu():
    ba = augment.BatchAugment(DataConfig(size=64))
    x = torch.rand(16, 3, 64, 64)
    keys = [f"k{i}" for i in range(16)]
    cpu, _ = ba(x, keys, epoch=1)
    gpu, _ = ba(x.cuda(), keys, epoch=1)
    assert (gpu.cpu() - cpu).abs().max() < 1e-3
