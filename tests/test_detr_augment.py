"""DINO's training augmentation (`DetrTrainAugment`) against mmdetection 3.3's own transforms, and the epoch plan
that groups images by the padded shape their random crop gives (`DrawnGroupEpochs`)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from cankd_jax.data import make_data
from cankd_jax.data.detection import DetrTrainAugment, bucket_of, bucket_shapes, training_objects
from cankd_jax.data.pipeline import DrawnGroupEpochs, GroupedEpochs, make_train_iterator
import openmmlab_reference as mr
from detection_helpers import mock_coco


def _dino_pipeline() -> list:
    """The training pipeline of mmdet's `dino-4scale_r50_8xb2-12e_coco.py` (the authors' DINO configs copy it)."""
    from mmengine.config import Config

    return Config.fromfile(os.path.join(mr.CONFIGS, "dino", "dino-4scale_r50_8xb2-12e_coco.py")).train_pipeline


def test_for_scale_gives_mmdets_dino_sizes_at_1333x800():
    pipeline = _dino_pipeline()
    flip, choice = pipeline[2], pipeline[3]
    assert flip["type"] == "RandomFlip" and choice["type"] == "RandomChoice"
    multi_scale, (crop_resize, crop, final_resize) = choice["transforms"]
    ours = DetrTrainAugment.for_scale((1333, 800))
    assert ours.flip_prob == flip["prob"]
    assert ours.short_edges == tuple(min(s) for s in multi_scale[0]["scales"]) == \
        tuple(min(s) for s in final_resize["scales"])
    assert {max(s) for s in multi_scale[0]["scales"]} == {max(ours.scale)}
    assert ours.crop_short_edges == tuple(min(s) for s in crop_resize["scales"])
    assert {max(s) for s in crop_resize["scales"]} == {ours.crop_long_edge}
    assert crop["crop_type"] == "absolute_range" and tuple(crop["crop_size"]) == ours.crop_range
    assert crop["allow_negative_crop"] and all(t["keep_ratio"] for t in (multi_scale[0], crop_resize, final_resize))


class _Recorder:
    """A generator that records each draw (kind, arguments, value), to replay it into mmdet's `np.random` calls."""

    def __init__(self, seed):
        self.rng, self.draws = np.random.default_rng(seed), []

    def random(self):
        value = self.rng.random()
        self.draws.append(("random", (), value))
        return value

    def integers(self, *args):
        value = self.rng.integers(*args)
        self.draws.append(("integers", args, int(value)))
        return value


def _replay(monkeypatch, draws, flip_prob):
    """Patch np.random.choice / randint so mmdet's transforms make our recorded draws, checking that each mmdet
    call draws from the range ours did."""
    queue = list(draws)

    def choice(options, p=None):
        kind, args, value = queue.pop(0)
        if list(options) == ["horizontal", None]:  # RandomFlip: horizontal with probability `prob`
            assert kind == "random" and p == [flip_prob, 1 - flip_prob]
            return "horizontal" if value < flip_prob else None
        assert kind == "integers" and args == (len(options),) and p is None  # RandomChoice: uniform branch
        return options[value]

    def randint(low, high=None):
        kind, args, value = queue.pop(0)
        assert kind == "integers" and args == ((low,) if high is None else (low, high)), (args, low, high)
        return value

    monkeypatch.setattr(np.random, "choice", choice)
    monkeypatch.setattr(np.random, "randint", randint)
    return queue


def _record(rng, h, w, n=12):
    xy = rng.uniform(-0.1, 1.0, (n, 2)) * (w, h)
    wh = rng.uniform(0.02, 0.6, (n, 2)) * (w, h)
    boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    boxes[0] = (5, 5, 5.4, 40)  # narrower than a pixel: not trained
    return {"image": rng.integers(0, 256, (h, w, 3)).astype(np.uint8), "image_id": np.int64(3), "boxes": boxes,
            "labels": rng.integers(0, 80, n).astype(np.int32), "is_crowd": np.arange(n) == 1,
            "area": np.ones(n, np.float32)}


@pytest.mark.parametrize("size", [(480, 640), (640, 427), (500, 500), (333, 1000), (120, 90)])
def test_images_and_boxes_match_mmdets_dino_pipeline_on_the_same_draws(monkeypatch, size):
    """mmdet's RandomFlip + RandomChoice(...) built from its DINO config, fed our draws: the same image (to cv2's
    rounding) and the same boxes, on both branches, both flips, portrait / landscape / square / tiny images."""
    import torch
    from mmdet.registry import TRANSFORMS
    from mmdet.structures.bbox import HorizontalBoxes
    from mmengine.registry import DefaultScope

    with DefaultScope.overwrite_default_scope("mmdet"):
        mmdet_transforms = [TRANSFORMS.build(t) for t in _dino_pipeline()[2:4]]
    ours = DetrTrainAugment.for_scale((1333, 800), max_boxes=16)
    mean, std = np.asarray(ours.mean, np.float32), np.asarray(ours.std, np.float32)
    seen = set()
    for seed in range(12):  # seeds 0-11 draw both branches with both flips
        rng = np.random.default_rng([seed, *size])
        record = _record(rng, *size)
        recorder = _Recorder(seed)
        out = ours(record, recorder)
        geometry = ours.geometry(size, np.random.default_rng(seed))  # the same draws, without the recorder
        seen.add((geometry.flip, geometry.crop is None))
        keep = training_objects(record["boxes"], record["is_crowd"], size)  # mmdet's parse_data_info + ignore
        results = {"img": record["image"].copy(), "img_shape": size, "ori_shape": size,
                   "gt_bboxes": HorizontalBoxes(torch.from_numpy(record["boxes"][keep])),
                   "gt_bboxes_labels": record["labels"][keep], "gt_ignore_flags": np.zeros(keep.sum(), bool)}
        left = _replay(monkeypatch, recorder.draws, ours.flip_prob)
        for t in mmdet_transforms:
            results = t(results)
        monkeypatch.undo()
        assert not left, "mmdet made fewer draws than ours"
        h, w = results["img"].shape[:2]
        label = out["label"]
        assert (h, w) == geometry.size and tuple(label["img_shape"]) == (h, w)
        buckets = bucket_shapes((1333, 800))
        assert out["image"].shape[:2] == buckets[bucket_of((h, w), buckets)]
        pixels = out["image"][:h, :w] * std + mean
        # cv2's uint8 bilinear resize weighs in 11-bit fixed point, ours in float32 rounded once: on these noise
        # images an eighth of the values land 1 apart per resize (a one-pixel shift would put them ~80 apart)
        resizes = 1 if geometry.crop is None else 2
        diff = np.abs(pixels - results["img"].astype(np.float32))
        assert diff.max() <= resizes + 1e-3 and diff.mean() < 0.15 * resizes, (diff.max(), diff.mean())
        assert not out["image"][h:].any() and not out["image"][:, w:].any()
        n = int(label["valid"].sum())
        assert n == len(results["gt_bboxes"])
        np.testing.assert_allclose(label["boxes"][:n], results["gt_bboxes"].numpy(), rtol=1e-6, atol=1e-4)
        np.testing.assert_array_equal(label["labels"][:n], results["gt_bboxes_labels"])
    if min(size) > 200:
        assert seen == {(f, c) for f in (False, True) for c in (False, True)}, seen


def test_drawn_groups_put_every_image_in_its_batchs_bucket_and_follow_the_grouped_walk():
    rng = np.random.default_rng(0)
    sizes = np.where(rng.random((41, 1)) < 0.6, [480, 640], [640, 480])
    augment = DetrTrainAugment.for_scale((1333, 800))
    plan = DrawnGroupEpochs(sizes, augment.bucket, 2, 4, seed=5)
    assert plan.length == (41 // 4 - 1) * 4 and plan.num_groups == 2
    buckets = bucket_shapes((1333, 800))
    for epoch in range(3):
        order = plan(epoch)
        assert len(order) == plan.length and len(set(order.tolist())) == len(order)
        # the draw the augmentation will make for each record (the plan's generator) gives its batch's bucket
        final = [augment.geometry(sizes[i], plan.generator(epoch, i)).size for i in order]
        groups = np.array([bucket_of(s, buckets) for s in final]).reshape(-1, 4)
        assert (groups == groups[:, :1]).all()
        # crops turn some landscape images portrait (and back): the groups are not the images' orientations
        drawn = plan.groups(epoch)
        assert (drawn != (sizes[:, 0] > sizes[:, 1])).any()
        # the same walk as GroupedEpochs with this epoch's groups, cut to the fixed length
        fixed = GroupedEpochs(drawn, 4, seed=5)(epoch)
        np.testing.assert_array_equal(order, fixed[: plan.length])
    assert plan(0).tolist() != plan(1).tolist()
    with pytest.raises(ValueError, match="do not surely fill"):
        DrawnGroupEpochs(sizes[:5], augment.bucket, 2, 4, seed=0)


def test_the_sampler_hands_each_record_the_generator_its_group_was_drawn_with():
    """Through the Grain loader, with worker processes: the augmentation sees the plan's generator of
    (epoch, record), at every position of every epoch, whatever rows a process reads."""

    class Ids:
        def __len__(self):
            return 10

        def __getitem__(self, i):
            return {"id": np.int32(i)}

    def draw(record, rng):
        return {"id": record["id"], "u": np.float64(rng.random())}

    plan = DrawnGroupEpochs(np.zeros((10, 2)), lambda size, rng: int(rng.random() < 0.5), 2, 2, seed=1)
    steps = 2 * plan.length // 2
    whole = make_train_iterator(Ids(), draw, global_batch_size=2, seed=1, epoch_plan=plan, worker_count=2)
    batches = [next(whole) for _ in range(steps)]
    ids = np.concatenate([b["id"] for b in batches])
    np.testing.assert_array_equal(ids, np.concatenate([plan(0), plan(1)]))
    epochs = np.repeat([0, 1], plan.length)
    expected = [plan.generator(e, i).random() for e, i in zip(epochs, ids)]
    np.testing.assert_array_equal(np.concatenate([b["u"] for b in batches]), expected)
    second_row = make_train_iterator(Ids(), draw, global_batch_size=2, seed=1, epoch_plan=plan, rows=(1, 2))
    np.testing.assert_array_equal(np.concatenate([next(second_row)["u"] for _ in range(steps)]), expected[1::2])


def test_mock_coco_with_detr_augment_fills_both_buckets_and_resumes_exactly(tmp_path):
    with mock_coco(str(tmp_path), 24):
        data = make_data({"name": "coco", "data_dir": str(tmp_path), "scale": (96, 48), "min_size": 0,
                          "augment": "detr", "filter_empty": False}, task="detection")
        assert isinstance(data.train_transform, DetrTrainAugment) and data.num_train_shapes(4) == 2
        assert data.train_transform.short_edges == (29, 31, 33, 35, 36, 38, 40, 42, 44, 46, 48)
        it = data.train_iterator(4, seed=2)
        batches = [next(it) for _ in range(6)]
        state = json.loads(json.dumps(it.get_state()))
        expected = [next(it) for _ in range(2)]
        resumed = data.train_iterator(4, seed=2, state=state)
        got = [next(resumed) for _ in range(2)]
    assert {b["image"].shape[1:3] for b in batches} == {(64, 96), (96, 64)}
    for b in batches:
        h, w = b["label"]["img_shape"].T
        assert (h <= b["image"].shape[1]).all() and (w <= b["image"].shape[2]).all()
        assert (b["label"]["boxes"][..., 2] <= w[:, None]).all() and (b["label"]["boxes"][..., 3] <= h[:, None]).all()
    for x, y in zip(expected, got):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"]["boxes"], y["label"]["boxes"])
    with pytest.raises(ValueError, match="unknown data.augment 'mosaic'"):
        make_data({"name": "coco", "data_dir": str(tmp_path), "augment": "mosaic"}, task="detection")
