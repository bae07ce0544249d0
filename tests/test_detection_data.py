"""Detection data: mmdet's resize / flip / pad on the boxes, crowd and empty-image handling, buckets, the grouped
global order (topology-independent, resumable), TFDS coco through mock data, and COCOeval on the ground truth."""

from __future__ import annotations

import json

import grain.python as grain
import numpy as np
import pytest

from cankd_jax.data import make_data, make_train_iterator
from cankd_jax.data.detection import (
    CAFFE_NORM, DetEvalPreprocess, DetTrainAugment, bucket_of, bucket_shapes, empty_train_example,
)
from cankd_jax.data.detection_index import DetectionIndex
from cankd_jax.data.pipeline import GroupedEpochs
from cankd_jax.data.sources import COCO_CATEGORY_IDS
from cankd_jax.train.tasks import coco_eval
from detection_helpers import mock_coco


def _record(h=40, w=60):
    r = np.random.default_rng(0)
    return {"image": r.integers(0, 256, (h, w, 3)).astype(np.uint8), "image_id": np.int64(7),
            "boxes": np.array([[4, 6, 30, 20], [10, 10, 10.5, 30], [0, 0, 59, 39], [50, 30, 70, 50],
                               [61, 1, 70, 9]], np.float32),
            "labels": np.array([3, 1, 2, 4, 5], np.int32), "is_crowd": np.array([0, 0, 1, 0, 0], bool),
            "area": np.ones(5, np.float32)}


class _Flip:
    """A generator stand-in whose only draw (the flip) is fixed."""

    def __init__(self, flip):
        self.value = 0.0 if flip else 0.99

    def random(self):
        return self.value


def test_buckets_at_1333x800_and_orientation():
    assert bucket_shapes((1333, 800)) == ((800, 1344), (1344, 800))
    assert bucket_shapes((800, 1333)) == ((800, 1344), (1344, 800))  # only the long and short edges matter
    assert bucket_shapes((128, 128)) == ((128, 128),)
    buckets = bucket_shapes((1333, 800))
    assert [bucket_of(s, buckets) for s in ((480, 640), (640, 480), (500, 500))] == [0, 1, 0]


@pytest.mark.parametrize("flip", [False, True])
def test_train_boxes_follow_resize_flip_and_pad(flip):
    rec = _record()
    out = DetTrainAugment(scale=(120, 60), max_boxes=6)(rec, _Flip(flip))
    # keep-ratio: 40x60 -> factor min(120/60, 60/40) = 1.5 -> 60x90; landscape bucket (64, 128)
    assert out["image"].shape == (64, 128, 3) and out["image"].dtype == np.float32
    label = out["label"]
    np.testing.assert_array_equal(label["img_shape"], [60, 90])
    np.testing.assert_array_equal(label["pad_shape"], [64, 96])
    # Dropped: the crowd box, the one 0.5 pixel wide, the one outside the image; the partly outside one is clipped.
    assert label["valid"].tolist() == [True, True, False, False, False, False]
    expected = np.array([[6, 9, 45, 30], [75, 45, 90, 60]], np.float32)
    if flip:
        expected = np.stack([90 - expected[:, 2], expected[:, 1], 90 - expected[:, 0], expected[:, 3]], 1)
    np.testing.assert_allclose(label["boxes"][:2], expected, rtol=1e-6)
    assert label["labels"][:2].tolist() == [3, 4] and not label["boxes"][2:].any()
    # Padding after normalisation: zeros; the image itself is the normalised, resized (and flipped) one.
    assert not out["image"][60:].any() and not out["image"][:, 90:].any()
    mean = np.array([123.675, 116.28, 103.53], np.float32)
    corner = out["image"][0, 89 if flip else 0]
    np.testing.assert_allclose(corner * np.array([58.395, 57.12, 57.375]) + mean, rec["image"][0, 0], atol=1e-3)
    # The layout the benchmarks build their abstract and random batches from is the one training yields.
    layout = lambda ex: {k: layout(v) if isinstance(v, dict) else (v.shape, v.dtype) for k, v in ex.items()}  # noqa: E731
    assert layout(out) == layout(empty_train_example((64, 128), 6))
    with pytest.raises(ValueError, match="max_boxes=1"):
        DetTrainAugment(scale=(120, 60), max_boxes=1)(rec, _Flip(flip))


def test_caffe_normalisation_is_bgr_minus_the_mean_and_eval_keeps_what_maps_back():
    rec = _record(30, 20)  # portrait
    out = DetEvalPreprocess(scale=(120, 60), **CAFFE_NORM)(rec)
    assert out["image"].shape == (128, 64, 3)
    np.testing.assert_array_equal(out["img_shape"], [90, 60])
    np.testing.assert_allclose(out["scale_factor"], [3.0, 3.0])
    assert int(out["image_id"]) == 7
    np.testing.assert_allclose(out["image"][0, 0] + np.array(CAFFE_NORM["mean"]), rec["image"][0, 0, ::-1],
                               atol=1e-3)


class _AnnSource:
    """Records with given sizes and objects: `annotations(i)` and `[i]` (a blank image)."""

    def __init__(self, sizes, objects):
        self.sizes, self.objects = sizes, objects

    def __len__(self):
        return len(self.sizes)

    def annotations(self, i):
        boxes, crowd = self.objects[i]
        return {"size": np.asarray(self.sizes[i], np.int32), "image_id": np.int64(100 + i),
                "boxes": np.asarray(boxes, np.float32).reshape(-1, 4), "labels": np.zeros(len(boxes), np.int32),
                "is_crowd": np.asarray(crowd, bool), "area": np.full(len(boxes), 50.0, np.float32)}

    def __getitem__(self, i):
        a = self.annotations(i)
        return {"image": np.zeros((*self.sizes[i], 3), np.uint8), **{k: v for k, v in a.items() if k != "size"}}

    def __repr__(self):
        return f"_AnnSource({len(self)})"


def test_index_filters_empty_images_keeps_crowd_only_ones_and_builds_the_ground_truth(tmp_path):
    box = [[1, 1, 9, 9]]
    source = _AnnSource([(20, 30), (20, 30), (20, 30), (10, 40)],
                        [(box, [False]), ([], []), (box, [True]), (box, [False])])
    index = DetectionIndex.build(source)
    # mmdet's filter_empty_gt drops images without any annotation, crowd ones count; min_size the small sides.
    assert index.trainable().tolist() == [0, 2, 3]
    assert index.trainable(min_size=16).tolist() == [0, 2]
    assert index.trainable(filter_empty=False).tolist() == [0, 1, 2, 3]
    assert index.training_counts().tolist() == [1, 0, 0, 1]  # the crowd box takes no part in training
    gt = index.coco_ground_truth((11, 12))
    assert [i["id"] for i in gt["images"]] == [100, 101, 102, 103]
    assert [(a["image_id"], a["iscrowd"], a["bbox"], a["category_id"]) for a in gt["annotations"]] == [
        (100, 0, [1.0, 1.0, 8.0, 8.0], 11), (102, 1, [1.0, 1.0, 8.0, 8.0], 11), (103, 0, [1.0, 1.0, 8.0, 8.0], 11)]
    path = str(tmp_path / "index.npz")
    index.save(path)
    again = DetectionIndex.load(path)
    for a, b in zip(index.__dict__.values(), again.__dict__.values()):
        np.testing.assert_array_equal(a, b)


def test_cocoeval_gives_ap_1_on_the_ground_truth():
    r = np.random.default_rng(0)
    source = _AnnSource([(200, 300)] * 6, [])
    source.objects = []
    for _ in range(6):
        xy = r.uniform(0, 150, (5, 2))
        boxes = np.concatenate([xy, xy + r.uniform(4, 140, (5, 2))], 1)
        source.objects.append((boxes, [False, False, False, False, True]))
    index = DetectionIndex.build(source)
    gt = index.coco_ground_truth((1,))
    rows = np.array([[a["image_id"], *a["bbox"], 0.9, a["category_id"]] for a in gt["annotations"]])
    metrics = coco_eval(gt, rows)
    assert metrics["mAP"] == pytest.approx(1.0) and metrics["AP50"] == pytest.approx(1.0)
    assert metrics["AP75"] == pytest.approx(1.0)
    worse = rows.copy()
    worse[::3, 1] += worse[::3, 3] * 0.6  # every third box shifted off its object
    assert coco_eval(gt, worse)["mAP"] < 0.9


def _epoch_batches(plan, epoch, groups):
    order = plan(epoch)
    assert len(order) == plan.length and len(set(order.tolist())) == len(order)
    batches = order.reshape(-1, plan.global_batch_size)
    assert all(len(set(groups[b].tolist())) == 1 for b in batches)
    return batches


def test_grouped_epochs_are_one_group_per_batch_seeded_and_mmdet_ordered():
    groups = np.random.default_rng(1).integers(0, 2, 37)
    plan = GroupedEpochs(groups, 4, seed=3)
    counts = np.bincount(groups)
    assert plan.length == 4 * int(sum(counts // 4)) and plan.num_groups == 2
    a, b = _epoch_batches(plan, 0, groups), _epoch_batches(plan, 1, groups)
    assert a.tolist() != b.tolist()
    np.testing.assert_array_equal(plan(0), GroupedEpochs(groups, 4, seed=3)(0))
    # mmdet's order: walking the epoch's permutation, a batch is emitted when its bucket fills.
    perm = np.random.default_rng([3, 0]).permutation(37)
    buckets, expected = {0: [], 1: []}, []
    for i in perm:
        buckets[groups[i]].append(i)
        if len(buckets[groups[i]]) == 4:
            expected.append(buckets[groups[i]])
            buckets[groups[i]] = []
    assert a.tolist() == expected
    assert GroupedEpochs(np.zeros(9, int), 4, 0).num_groups == 1
    with pytest.raises(ValueError, match="no group holds a whole global batch"):
        GroupedEpochs(np.array([0, 1, 1]), 4, 0)


def _coco(data_dir, **options):
    cfg = {"name": "coco", "data_dir": str(data_dir), "scale": (96, 48), "min_size": 0, "eval_batch_size": 4,
           **options}
    return make_data(cfg, task="detection")


def test_mock_coco_boxes_labels_ids_and_ground_truth(tmp_path):
    with mock_coco(str(tmp_path), 12):
        data = _coco(tmp_path)
        raw = data.train_source._source._source[0]  # noqa: SLF001 - the TFDS example behind record 0
        record = data.eval_source[0]
        evals = list(data.eval_iterator(shard_options=grain.ShardOptions(0, 1)))
        batch = next(data.train_iterator(4, seed=0))
    assert data.num_classes == 80 and data.category_ids == COCO_CATEGORY_IDS
    h, w = record["image"].shape[:2]
    n = len(record["boxes"])
    ymin, xmin, ymax, xmax = raw["objects"]["bbox"][:n].T
    # Normalised yxyx -> absolute xyxy pixels; labels stay contiguous, crowd flags kept.
    np.testing.assert_allclose(record["boxes"], np.stack([xmin * w, ymin * h, xmax * w, ymax * h], 1), rtol=1e-6)
    assert record["labels"].dtype == np.int32 and record["is_crowd"].dtype == bool
    assert data.input_size == (64, 96) and data.splits.buckets == ((64, 96), (96, 64))
    # Each eval image once, with its id; a batch per bucket shape; the ground truth lists them all.
    ids = [int(i) for b in evals for i, v in zip(b["image_id"], b["valid"]) if v]
    gt = data.coco_ground_truth()
    assert sorted(ids) == sorted(im["id"] for im in gt["images"]) and len(ids) == 12
    assert {b["image"].shape[1:3] for b in evals} <= {(64, 96), (96, 64)}
    assert any(a["iscrowd"] for a in gt["annotations"]) and any(not a["iscrowd"] for a in gt["annotations"])
    assert {a["category_id"] for a in gt["annotations"]} <= set(COCO_CATEGORY_IDS)
    assert batch["image"].shape[0] == 4 and batch["label"]["boxes"].shape == (4, data.splits.max_boxes, 4)
    assert data.splits.max_boxes % 8 == 0


def test_mock_coco_global_order_is_topology_independent_and_resumes_exactly(tmp_path):
    steps = 6
    with mock_coco(str(tmp_path), 24):
        data = _coco(tmp_path, flip_prob=0.5)
        assert data.num_train_shapes(4) == 2  # mock images come in both orientations
        single = [next(it) for it in [data.train_iterator(4, seed=1)] for _ in range(steps)]
        halves = [data.train_iterator(4, seed=1, rows=(2 * i, 2 * i + 2)) for i in range(2)]
        parts = [[next(it) for _ in range(steps)] for it in halves]
        straight = data.train_iterator(4, seed=1)
        for _ in range(3):
            next(straight)
        state = json.loads(json.dumps(straight.get_state()))
        resumed = data.train_iterator(4, seed=1, state=state)
        expected, got = [next(straight) for _ in range(3)], [next(resumed) for _ in range(3)]
    shapes = {b["image"].shape[1:3] for b in single}
    assert shapes == {(64, 96), (96, 64)}, shapes  # both buckets, each batch one of them
    for whole, a, b in zip(single, *parts):
        np.testing.assert_array_equal(whole["image"], np.concatenate([a["image"], b["image"]]))
        for k in whole["label"]:
            np.testing.assert_array_equal(whole["label"][k], np.concatenate([a["label"][k], b["label"][k]]))
    for x, y in zip(expected, got):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"]["boxes"], y["label"]["boxes"])


def test_synthetic_detection_boxes_match_the_scenes_objects(tmp_path):
    data = make_data({"name": "synthetic_detection", "data_dir": str(tmp_path), "image_size": 32, "num_train": 8,
                      "num_test": 4, "scale": (64, 64), "eval_batch_size": 4}, task="detection")
    from cankd_jax.data.scenes import generate_scenes

    scenes = generate_scenes(8, 32, 0, stream=0)
    rec = data.train_source[0]
    keep = scenes["present"][0]
    ymin, xmin, ymax, xmax = scenes["boxes"][0][keep].T * 32
    np.testing.assert_allclose(rec["boxes"], np.stack([xmin, ymin, xmax, ymax], 1), atol=1e-4)
    np.testing.assert_array_equal(rec["labels"], scenes["labels"][0][keep] - 1)
    assert data.num_train_shapes(4) == 1 and data.input_size == (64, 64) and data.num_classes == 6
    batch = next(data.train_iterator(4, seed=0))
    assert batch["image"].shape == (4, 64, 64, 3)
    np.testing.assert_array_equal(batch["label"]["img_shape"], np.full((4, 2), 64.0))
    # A second start reads the index from its cache, and gives the same data.
    again = make_data({"name": "synthetic_detection", "data_dir": str(tmp_path), "image_size": 32, "num_train": 8,
                       "num_test": 4, "scale": (64, 64), "eval_batch_size": 4}, task="detection")
    np.testing.assert_array_equal(again.splits.train_index.boxes, data.splits.train_index.boxes)
    assert len(list((tmp_path / "cankd_jax_index").glob("*.npz"))) == 2


def test_grouped_iterator_rows_match_the_plan_on_plain_records():
    """The global order with the grouped plan: stream positions map onto the plan exactly as with ShuffledEpochs."""

    class Ids:
        def __len__(self):
            return 10

        def __getitem__(self, i):
            return {"id": np.int32(i)}

    groups = np.array([0, 1] * 5)
    plan = GroupedEpochs(groups, 2, seed=0)
    it = make_train_iterator(Ids(), lambda r, g: r, global_batch_size=2, seed=0, epoch_plan=plan)
    seen = [next(it)["id"].tolist() for _ in range(2 * plan.length // 2)]
    np.testing.assert_array_equal(np.concatenate(seen), np.concatenate([plan(0), plan(1)]))
