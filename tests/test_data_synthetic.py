"""The built-in synthetic scene-parsing set: generation, TFDS preparation, determinism, difficulty."""

from __future__ import annotations

import os

import numpy as np
import pytest

from cankd_jax.data import prepare_synthetic
from cankd_jax.data.scenes import CLASS_NAMES, NUM_CLASSES, generate_scenes

SMALL = dict(image_size=32, num_train=48, num_test=12, seed=0)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def builder(data_dir):
    return prepare_synthetic(data_dir, **SMALL)


def _split(builder, split):
    source = builder.as_data_source(split=split)
    return [source[i] for i in range(len(source))]


def test_splits_shapes_and_features(builder):
    assert len(builder.as_data_source(split="train")) == SMALL["num_train"]
    assert len(builder.as_data_source(split="test")) == SMALL["num_test"]
    for ex in _split(builder, "train"):
        assert ex["image"].shape == (32, 32, 3) and ex["image"].dtype == np.uint8
        assert ex["mask"].shape == (32, 32) and ex["mask"].dtype == np.uint8
        assert ex["mask"].max() < NUM_CLASSES  # every pixel labelled: no 255 in the synthetic set
        boxes = np.asarray(ex["objects"]["bbox"], np.float32).reshape(-1, 4)
        labels = np.asarray(ex["objects"]["label"])
        assert len(boxes) == len(labels) >= 1
        assert np.all((boxes >= 0) & (boxes <= 1)) and np.all(boxes[:, 2:] > boxes[:, :2])
        assert set(labels.tolist()) <= set(np.unique(ex["mask"]).tolist()) - {0}


def test_masks_have_several_classes_and_images_vary(builder):
    examples = _split(builder, "train")
    masks = np.stack([ex["mask"] for ex in examples])
    assert set(np.unique(masks).tolist()) == set(range(NUM_CLASSES))
    assert np.mean([len(np.unique(m)) for m in masks]) >= 2.5  # background + about two object classes per image
    images = np.stack([ex["image"] for ex in examples]).astype(np.float32)
    assert images.mean(axis=(1, 2, 3)).std() > 5 and images.std(axis=(1, 2, 3)).mean() > 15


def test_box_is_the_visible_extent_of_a_lone_object():
    scenes = generate_scenes(64, 32, seed=3)
    for i in range(64):
        labels = scenes["labels"][i][scenes["present"][i]]
        for label, box in zip(labels, scenes["boxes"][i][scenes["present"][i]], strict=True):
            if (labels == label).sum() == 1:  # a class seen once: its mask pixels are this object's
                ys, xs = np.nonzero(scenes["mask"][i] == label)
                np.testing.assert_allclose(box, [ys.min() / 32, xs.min() / 32, (ys.max() + 1) / 32,
                                                 (xs.max() + 1) / 32])
                return
    pytest.fail("no image with a class appearing once")


def test_same_seed_same_data_other_seed_other_data(builder, tmp_path):
    again = prepare_synthetic(str(tmp_path), **SMALL)  # generated afresh elsewhere
    for split in ("train", "test"):
        for a, b in zip(_split(builder, split), _split(again, split), strict=True):
            np.testing.assert_array_equal(a["image"], b["image"])
            np.testing.assert_array_equal(a["mask"], b["mask"])
    other = generate_scenes(SMALL["num_train"], 32, seed=1)
    assert not np.array_equal(other["image"], np.stack([ex["image"] for ex in _split(builder, "train")]))
    # train and test are different streams; a larger split extends a smaller one
    train, test = generate_scenes(4, 32, 0, stream=0), generate_scenes(4, 32, 0, stream=1)
    assert not np.array_equal(train["image"], test["image"])
    small, large = generate_scenes(5, 32, 0), generate_scenes(300, 32, 0)
    assert all(np.array_equal(small[k], large[k][:5]) for k in small)


def test_prepare_reuses_prepared_data(builder, data_dir):
    def files():
        return {os.path.join(r, f): os.stat(os.path.join(r, f)).st_mtime_ns
                for r, _, fs in os.walk(builder.data_dir) for f in fs}

    before = files()
    again = prepare_synthetic(data_dir, **SMALL)
    assert again.is_prepared() and again.data_dir == builder.data_dir
    assert files() == before and before  # nothing generated or written again


def test_colour_alone_does_not_solve_it():
    """The best per-pixel colour rule (Bayes on a 16^3 RGB histogram) stays near all-background mIoU."""
    train, test = generate_scenes(256, 32, 0, stream=0), generate_scenes(128, 32, 0, stream=1)

    def bins(images):
        q = images.astype(np.int32) // 16
        return (q[..., 0] * 16 + q[..., 1]) * 16 + q[..., 2]

    counts = np.zeros((16**3, NUM_CLASSES))
    np.add.at(counts, (bins(train["image"]).ravel(), train["mask"].ravel()), 1)
    pred, gt = counts.argmax(1)[bins(test["image"])], test["mask"]
    cm = np.bincount(gt.ravel() * NUM_CLASSES + pred.ravel(), minlength=NUM_CLASSES**2).reshape(NUM_CLASSES, -1)
    iou = np.diag(cm) / np.maximum(cm.sum(0) + cm.sum(1) - np.diag(cm), 1)
    assert iou[1:].max() < 0.2 and iou.mean() < 0.25, iou


def test_class_names():
    assert CLASS_NAMES[0] == "background" and len(CLASS_NAMES) == NUM_CLASSES == 7


def test_bad_config_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="image_size"):
        prepare_synthetic(str(tmp_path), image_size=4)
