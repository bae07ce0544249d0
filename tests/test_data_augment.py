"""Numpy image ops and the mmseg-style / classification preprocessing."""

from __future__ import annotations

import numpy as np
import pytest

from cankd_jax.data.classification import ClsEvalPreprocess, ClsTrainAugment, random_resized_crop_box
from cankd_jax.data.image_ops import IMAGENET_MEAN, IMAGENET_STD, normalize, rescale_size
from cankd_jax.data.image_ops import hsv_to_rgb, resize_bilinear, resize_nearest, rgb_to_hsv
from cankd_jax.data.segmentation import PhotoMetricDistortion, SegEvalPreprocess, SegTrainAugment, pad_to
from cankd_jax.data.segmentation import random_crop, random_resize, random_resize_crop


def _record(rng, h=40, w=60, classes=5):
    return {"image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
            "label": rng.integers(0, classes, (h, w)).astype(np.uint8)}


def test_bilinear_uses_half_pixel_centres_like_opencv():
    row = np.array([[0, 255]], np.uint8)
    np.testing.assert_array_equal(resize_bilinear(row, (1, 4)), [[0, 64, 191, 255]])
    const = np.full((7, 5, 3), 77, np.uint8)
    np.testing.assert_array_equal(resize_bilinear(const, (13, 3)), np.full((13, 3, 3), 77))
    assert resize_bilinear(np.ones((4, 4), np.float32), (2, 8)).dtype == np.float32


def test_nearest_keeps_label_values():
    label = np.arange(12, dtype=np.uint8).reshape(3, 4)
    up = resize_nearest(label, (6, 8))
    np.testing.assert_array_equal(up[::2, ::2], label)
    assert set(np.unique(resize_nearest(label, (5, 3)))) <= set(label.ravel())


def test_windowed_resize_equals_resize_then_crop(rng):
    image = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
    for resize in (resize_bilinear, resize_nearest):
        np.testing.assert_array_equal(resize(image, (45, 70), (5, 9, 20, 31)), resize(image, (45, 70))[5:25, 9:40])
    with pytest.raises(ValueError, match="outside"):
        resize_bilinear(image, (45, 70), (30, 0, 20, 10))


def test_fused_resize_crop_matches_mmseg_order(rng):
    """Resizing only the crop gives what resizing everything and then cropping gives, with the same draws."""
    record = _record(rng, 37, 53, classes=3)
    record["label"][:18] = 1  # so that some crops fail the category-ratio check
    redraws = []
    for (scale, crop) in (((53, 37), (24, 32)), ((20, 10), (24, 32))):  # larger and smaller than the crop
        for seed in range(20):
            g1, g2 = np.random.default_rng(seed), np.random.default_rng(seed)
            full = random_crop(*random_resize(record["image"], record["label"], g1, scale, (0.5, 2.0)), g1, crop)
            fused = random_resize_crop(record["image"], record["label"], g2, scale, (0.5, 2.0), crop)
            for a, b in zip(full, fused, strict=True):
                np.testing.assert_array_equal(a, b)
            assert g1.random() == g2.random()
            redraws.append(fused[2])
    assert max(redraws) > 0  # the re-draw path was taken, and agreed


def test_rescale_size_keeps_ratio_like_mmcv():
    assert rescale_size((1024, 2048), (2048, 1024)) == (1024, 2048)
    assert rescale_size((1024, 2048), (1024, 512)) == (512, 1024)
    assert rescale_size((300, 400), (2048, 512)) == (512, 683)  # short edge binds


def test_normalisation_constants():
    np.testing.assert_allclose(IMAGENET_MEAN, [123.675, 116.28, 103.53])
    np.testing.assert_allclose(IMAGENET_STD, [58.395, 57.12, 57.375])
    out = normalize(np.stack([IMAGENET_MEAN, IMAGENET_MEAN + IMAGENET_STD]))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[0, 0, 0], [1, 1, 1]], atol=1e-6)


def test_hsv_round_trip_and_opencv_ranges(rng):
    rgb = rng.uniform(0, 255, (50, 3)).astype(np.float32)
    np.testing.assert_allclose(hsv_to_rgb(rgb_to_hsv(rgb)), rgb, atol=1e-3)
    np.testing.assert_allclose(rgb_to_hsv(np.array([[0, 255, 0]], np.float32)), [[60, 255, 255]])  # green: H=120/2


def test_train_augment_shapes_dtypes_and_determinism(rng):
    aug = SegTrainAugment(scale=(60, 40), crop_size=(24, 32))
    record = _record(rng)
    a = aug(record, np.random.default_rng(7))
    b = aug(record, np.random.default_rng(7))
    c = aug(record, np.random.default_rng(8))
    assert a["image"].shape == (24, 32, 3) and a["image"].dtype == np.float32
    assert a["label"].shape == (24, 32) and a["label"].dtype == np.int32
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
    assert not np.array_equal(a["image"], c["image"])


def test_cat_max_ratio_redraws_dominated_crops():
    image = np.zeros((100, 100, 3), np.uint8)
    label = np.ones((100, 100), np.uint8)
    label[:30, :30] = 2  # only crops near the top-left corner mix the classes enough
    label[60:, 60:] = 255  # ignored pixels do not count
    redraws = []
    for seed in range(20):
        _, crop, n = random_crop(image, label, np.random.default_rng(seed), (40, 40), cat_max_ratio=0.75)
        redraws.append(n)
        if n < 10:  # accepted: two classes, neither above 75 % of the labelled pixels
            counts = np.bincount(crop.ravel(), minlength=256)[:255]
            assert (counts > 0).sum() > 1 and counts.max() / counts.sum() < 0.75
    assert max(redraws) > 0 and min(redraws) < 10
    _, _, n = random_crop(image, np.ones_like(label), np.random.default_rng(0), (40, 40), cat_max_ratio=0.75)
    assert n == 10  # a one-class image never passes: the 11th crop is taken unchecked, as mmseg
    assert random_crop(image, label, np.random.default_rng(0), (40, 40), cat_max_ratio=1.0)[2] == 0


def test_padding_values(rng):
    image, label = pad_to(np.ones((3, 4, 3), np.float32), np.zeros((3, 4), np.uint8), (5, 6))
    assert image.shape == (5, 6, 3) and label.shape == (5, 6)
    assert np.all(image[3:] == 0) and np.all(image[:, 4:] == 0) and np.all(image[:3, :4] == 1)
    assert np.all(label[3:] == 255) and np.all(label[:, 4:] == 255) and np.all(label[:3, :4] == 0)
    # Through the pipeline: a 20x30 image at ratio 1 is smaller than the 32x48 crop.
    aug = SegTrainAugment(scale=(30, 20), crop_size=(32, 48), ratio_range=(1.0, 1.0), photometric=None)
    out = aug(_record(rng, 20, 30), np.random.default_rng(0))
    assert np.all(out["image"][20:] == 0.0) and np.all(out["image"][:, 30:] == 0.0)
    assert np.all(out["label"][20:] == 255) and np.all(out["label"][:, 30:] == 255)
    assert np.all(out["label"][:20, :30] < 5)


def test_flip_moves_image_and_label_together(rng):
    record = _record(rng, 24, 32)
    kwargs = dict(scale=(32, 24), crop_size=(24, 32), ratio_range=(1.0, 1.0), photometric=None)
    plain = SegTrainAugment(flip_prob=0.0, **kwargs)(record, np.random.default_rng(3))
    flipped = SegTrainAugment(flip_prob=1.0, **kwargs)(record, np.random.default_rng(3))
    np.testing.assert_array_equal(flipped["image"], plain["image"][:, ::-1])
    np.testing.assert_array_equal(flipped["label"], plain["label"][:, ::-1])
    np.testing.assert_allclose(plain["image"], normalize(record["image"]), atol=1e-6)


def test_photometric_distortion_changes_colour_not_shape(rng):
    image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    outs = [PhotoMetricDistortion()(image, np.random.default_rng(s)) for s in range(8)]
    assert all(o.shape == image.shape and o.dtype == np.uint8 for o in outs)
    assert sum(not np.array_equal(o, image) for o in outs) >= 6  # 1/16 chance of no step at all
    np.testing.assert_array_equal(outs[0], PhotoMetricDistortion()(image, np.random.default_rng(0)))
    # The hue step alone (others disabled) keeps brightness (the max channel) within rounding.
    hue_only = PhotoMetricDistortion(brightness_delta=0, contrast_range=(1, 1), saturation_range=(1, 1))
    out = hue_only(image, np.random.default_rng(1))
    assert np.abs(out.max(-1).astype(int) - image.max(-1)).max() <= 2


def test_eval_preprocess_resize_and_pad(rng):
    record = _record(rng, 40, 60)
    out = SegEvalPreprocess()(record)
    np.testing.assert_allclose(out["image"], normalize(record["image"]))
    np.testing.assert_array_equal(out["label"], record["label"])
    out = SegEvalPreprocess(scale=(30, 20), pad_size=(24, 32))(record)
    assert out["image"].shape == (24, 32, 3) and np.all(out["label"][20:] == 255)
    assert SegEvalPreprocess(scale=(16, 16), keep_ratio=False)(record)["label"].shape == (16, 16)
    with pytest.raises(ValueError, match="eval_pad_size"):
        SegEvalPreprocess(pad_size=(8, 8))(record)


def test_classification_transforms(rng):
    record = {"image": rng.integers(0, 256, (50, 70, 3), dtype=np.uint8), "label": np.int64(3)}
    flips = set()
    for seed in range(6):
        out = ClsTrainAugment(crop_size=(32, 32))(record, np.random.default_rng(seed))
        assert out["image"].shape == (32, 32, 3) and out["image"].dtype == np.float32
        assert out["label"].dtype == np.int32 and out["label"] == 3
        # The same draws by hand: the crop box, its resize, then the flip coin.
        g = np.random.default_rng(seed)
        top, left, h, w = random_resized_crop_box((50, 70), g, (0.08, 1.0), (3 / 4, 4 / 3))
        expected = resize_bilinear(record["image"][top:top + h, left:left + w], (32, 32))
        flip = g.random() < 0.5
        flips.add(flip)
        np.testing.assert_array_equal(out["image"], normalize(expected[:, ::-1] if flip else expected))
    assert flips == {True, False}
    # torchvision's Resize(40) + CenterCrop(32): short edge 50 -> 40, long edge 70 -> int(70 * 0.8) = 56.
    ev = ClsEvalPreprocess(crop_size=(32, 32), resize=40)(record)
    np.testing.assert_array_equal(ev["image"], normalize(resize_bilinear(record["image"], (40, 56))[4:36, 12:44]))
    top, left, h, w = random_resized_crop_box((50, 70), np.random.default_rng(0), (0.08, 1.0), (3 / 4, 4 / 3))
    assert 0 <= top <= 50 - h and 0 <= left <= 70 - w
    # Impossible ratio bounds fall back to the largest centred box within them.
    assert random_resized_crop_box((10, 100), np.random.default_rng(0), (0.9, 1.0), (1.0, 1.0)) == (0, 45, 10, 10)
