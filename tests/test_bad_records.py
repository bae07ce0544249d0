"""Data a run cannot use as it is: refused with its data set, split and record named, before training where the
data allows, and never turned into silently wrong targets.

Records are built here: prepared coco/2017 sets in ArrayRecord format written with TFDS's own serializer
(`detection_helpers.write_coco`), and single examples handed to `to_record` as TFDS decodes them.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from cankd_jax.data import make_data
from cankd_jax.data.pipeline import _pad_batch
from cankd_jax.data.sources import DATASETS, BadRecord, to_record
from detection_helpers import coco_example, encode_jpeg, write_coco

ADE, CITYSCAPES, CIFAR, COCO = (DATASETS[k] for k in ("scene_parse150", "cityscapes", "cifar10", "coco"))


def _ade(image: np.ndarray, red: np.ndarray) -> dict:
    annotation = np.zeros((*red.shape, 3), np.uint8)
    annotation[..., 0] = red
    return {"image": image, "annotation": annotation}


def _rgb(h: int, w: int, channels: int = 3, dtype=np.uint8) -> np.ndarray:
    return np.random.default_rng(h * w).integers(0, 200, (h, w, channels)).astype(dtype)


# --- one record ------------------------------------------------------------------------------------------------


def test_segmentation_labels_outside_the_classes_are_refused():
    # ADE's red channel holds class + 1: 120..150 are labels 119..149, outside its 100 classes (the loss would read
    # past its logits, the evaluation would drop the pixels)
    red = np.full((8, 12), 5, np.uint8)
    red[2:4, 3:5] = [[120, 150], [130, 0]]
    with pytest.raises(BadRecord, match=r"label values 119\.\.149 are outside the data set's 100 classes"):
        to_record(_ade(_rgb(8, 12), red), ADE)
    red[2:4, 3:5] = 100  # the last class, and 0 (unlabelled) is ignored
    red[0, 0] = 0
    label = to_record(_ade(_rgb(8, 12), red), ADE)["label"]
    assert label.max() == 255 and label[2, 3] == 99 and label[0, 0] == 255
    # Cityscapes' label ids outside its 19 training ids are ignored by its mapping, never refused
    ids = np.arange(96, dtype=np.uint8).reshape(8, 12, 1)
    label = to_record({"image_left": _rgb(8, 12), "segmentation_label": ids}, CITYSCAPES)["label"]
    assert label[0, 7] == 0 and label[7, 11] == 255


def test_a_label_map_of_another_size_than_its_image_is_refused():
    with pytest.raises(BadRecord, match="the label map is 16x24 for a 32x48 image"):
        to_record(_ade(_rgb(32, 48), np.ones((16, 24), np.uint8)), ADE)


@pytest.mark.parametrize("image, message", [
    (_rgb(8, 8, dtype=np.uint16), "the image is uint16, not 8-bit"),
    (_rgb(8, 8, channels=2), r"the image has shape \(8, 8, 2\)"),
    (_rgb(8, 8)[None], r"the image has shape \(1, 8, 8, 3\)"),
])
def test_images_of_another_dtype_or_channel_count_are_refused(image, message):
    with pytest.raises(BadRecord, match=message):
        to_record(_ade(image, np.ones((8, 8), np.uint8)), ADE)


def test_rgba_loses_its_alpha_and_grayscale_repeats():
    # as OpenCV's colour read (mmcv's loader) takes them
    rgba, red = _rgb(6, 7, channels=4), np.ones((6, 7), np.uint8)
    np.testing.assert_array_equal(to_record(_ade(rgba, red), ADE)["image"], rgba[..., :3])
    gray = _rgb(6, 7, channels=1)
    np.testing.assert_array_equal(to_record(_ade(gray, red), ADE)["image"], np.repeat(gray, 3, -1))


def test_class_and_object_labels_outside_the_classes_are_refused():
    with pytest.raises(BadRecord, match=r"the class label 10 is not one of the data set's 10 classes \(0\.\.9\)"):
        to_record({"image": _rgb(4, 4), "label": np.int64(10)}, CIFAR)
    assert to_record({"image": _rgb(4, 4), "label": np.int64(9)}, CIFAR)["label"] == 9
    objects = {"bbox": np.asarray([[0.1, 0.1, 0.5, 0.5]] * 2, np.float32), "label": np.asarray([3, 85]),
               "is_crowd": np.zeros(2, bool), "area": np.ones(2, np.float32)}
    example = {"image": _rgb(8, 8), "image/id": np.int64(7), "objects": objects}
    with pytest.raises(BadRecord, match=r"object labels 3\.\.85 are outside the data set's 80 classes"):
        to_record(example, COCO)


# --- a prepared coco/2017 --------------------------------------------------------------------------------------


def _config(data_dir: str, **extra) -> dict:
    return {"name": "coco", "data_dir": data_dir, "scale": (64, 48), "min_size": 0, **extra}


def _examples(n: int, offset: int = 0, **kwargs) -> list[dict]:
    return [coco_example(offset + i, **kwargs) for i in range(n)]


def test_an_image_that_cannot_be_decoded_is_named(tmp_path):
    # Bytes that are no image fail when the split is indexed (its sizes come from the headers), before training;
    # a JPEG cut short after its header passes the index and fails where a batch reads it.
    jpeg = encode_jpeg(_rgb(48, 64))
    for name, image, at_index in (("garbage", b"not an image at all", True), ("cut", jpeg[:len(jpeg) // 2], False)):
        train = _examples(4)
        train[2] = coco_example(2, image=image)
        write_coco(str(tmp_path / name), {"train": train, "validation": _examples(2, 10)})
        expected = (r"^coco:train record 2 cannot be read \(.*\); the prepared files may be damaged or incomplete: "
                    r"prepare it with `tfds build coco/2017")
        if at_index:
            with pytest.raises(BadRecord, match=expected):
                make_data(_config(str(tmp_path / name)), task="detection")
            continue
        data = make_data(_config(str(tmp_path / name)), task="detection")
        assert int(data.train_source[1]["image_id"]) == 1001  # every image trains: the records around it read
        with pytest.raises(BadRecord, match=expected):
            data.train_source[2]


def test_a_missing_shard_is_named(tmp_path):
    directory = write_coco(str(tmp_path), {"train": _examples(2), "validation": _examples(2, 10)})
    os.remove(os.path.join(directory, "coco-train.array_record-00000-of-00001"))
    with pytest.raises(BadRecord, match=r"coco:train record 0 cannot be read \(RuntimeError: .*No such file"):
        make_data(_config(str(tmp_path)), task="detection")


def test_object_labels_of_another_class_list_are_refused(tmp_path):
    # a set whose ClassLabel has COCO's 91 ids: every target would silently drop these objects
    train = _examples(3, objects=((0.1, 0.1, 0.5, 0.5, 85), (0.2, 0.2, 0.6, 0.6, 90)))
    write_coco(str(tmp_path), {"train": train, "validation": _examples(2, 10)}, num_classes=91)
    with pytest.raises(BadRecord, match=r"coco:train record 0: object labels 85\.\.90 are outside the data "
                                        r"set's 80 classes"):
        make_data(_config(str(tmp_path)), task="detection")


@pytest.mark.parametrize("objects", [((0.2, 0.2, 0.2, 0.6, 1),), ((0.2, 0.2, 0.201, 0.6, 1),)],
                         ids=["empty", "under-a-pixel"])
def test_training_boxes_that_all_drop_are_refused(tmp_path, objects):
    write_coco(str(tmp_path), {"train": _examples(3, objects=objects), "validation": _examples(2, 10)})
    with pytest.raises(ValueError, match="has a box that trains: its 3 annotations are all crowd boxes or under 1 "
                                         "pixel"):
        make_data(_config(str(tmp_path)), task="detection")


@pytest.mark.parametrize("crowd", [False, True], ids=["no-objects", "crowd-only"])
def test_an_eval_split_without_ground_truth_is_refused(tmp_path, crowd):
    validation = _examples(2, 10, objects=((0.1, 0.1, 0.5, 0.5, 1),) if crowd else (), crowd=crowd)
    write_coco(str(tmp_path), {"train": _examples(3), "validation": validation})
    with pytest.raises(ValueError, match=r"the eval split .*'validation'.* holds no annotated object .* COCO's mAP "
                                         r"is undefined there"):
        make_data(_config(str(tmp_path)), task="detection")


def test_an_empty_split_is_named(tmp_path):
    write_coco(str(tmp_path), {"train": [], "validation": _examples(2, 10)})
    with pytest.raises(ValueError, match=r"split 'train' of dataset 'coco' under .* holds no examples"):
        make_data(_config(str(tmp_path)), task="detection")


def test_another_version_or_unreadable_metadata_is_named(tmp_path):
    directory = write_coco(str(tmp_path / "a"), {"train": _examples(2), "validation": _examples(2, 10)})
    os.rename(directory, os.path.join(os.path.dirname(directory), "1.0.0"))
    with pytest.raises(FileNotFoundError, match=r"not found under .* \(it holds version 1\.0\.0; this project "
                                                r"reads 1\.1\.0\); prepare it with"):
        make_data(_config(str(tmp_path / "a")), task="detection")
    directory = write_coco(str(tmp_path / "b"), {"train": _examples(2), "validation": _examples(2, 10)})
    with open(os.path.join(directory, "dataset_info.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(FileNotFoundError, match=r"dataset_info\.json cannot be read: Expecting property name"):
        make_data(_config(str(tmp_path / "b")), task="detection")


def test_a_split_slice_is_checked_as_a_split(tmp_path):
    """`data.train_split` may be a TFDS slice. A set TFDS cannot open (here: prepared as TFRecord, which random
    access cannot read) is named for that, not for lacking the slice; a slice of a split it lacks is named as
    that split."""
    directory = write_coco(str(tmp_path), {"train": _examples(2), "validation": _examples(2, 10)})
    info = os.path.join(directory, "dataset_info.json")
    with open(info) as f:
        text = f.read()
    assert '"array_record"' in text
    with open(info, "w") as f:
        f.write(text.replace('"array_record"', '"tfrecord"'))
    with pytest.raises(ValueError, match="is not in ArrayRecord format"):
        make_data(_config(str(tmp_path), train_split="train[:1]"), task="detection")
    with pytest.raises(ValueError, match=r"has no split 'test\[:1\]'; it has train, validation"):
        make_data(_config(str(tmp_path), train_split="test[:1]"), task="detection")


def test_the_index_cache_follows_a_set_prepared_again_in_the_same_place(tmp_path):
    data_dir, cache = str(tmp_path / "data"), str(tmp_path / "cache")
    first = {"train": _examples(3), "validation": _examples(2, 10)}
    write_coco(data_dir, first)
    before = make_data(_config(data_dir, index_cache=cache), task="detection").coco_ground_truth()
    # Prepared again, same split lengths: other sizes and boxes
    shutil.rmtree(os.path.join(data_dir, "coco"))
    write_coco(data_dir, {"train": _examples(3, size=(40, 56)),
                          "validation": _examples(2, 10, size=(40, 56), objects=((0.5, 0.5, 0.9, 0.9, 7),))})
    after = make_data(_config(data_dir, index_cache=cache), task="detection").coco_ground_truth()
    assert before["images"][0]["height"] == 48 and after["images"][0]["height"] == 40
    assert [a["category_id"] for a in after["annotations"]] == [8, 8]  # label 7 is COCO's category 8
    assert len(os.listdir(cache)) >= 4  # both preparations' indices are there: the second did not reuse the first


# --- configuration and batching ---------------------------------------------------------------------------------


@pytest.mark.parametrize("extra, message", [
    (dict(crop_size=(32.5, 32)), r"data\.crop_size must be two positive whole numbers of pixels"),
    (dict(crop_size=64), r"data\.crop_size must be a pair of numbers"),
    (dict(ratio_range=(1.0,)), r"data\.ratio_range must be \(low, high\) with 0 < low <= high"),
    (dict(ratio_range="abc"), r"data\.ratio_range must be a pair of numbers"),
    (dict(ratio_range=(2.0, 1.0)), r"data\.ratio_range must be \(low, high\)"),
    (dict(cat_max_ratio=0.0), r"data\.cat_max_ratio must be in \(0, 1\]"),
])
def test_segmentation_sizes_and_ranges_are_checked(extra, message):
    with pytest.raises(ValueError, match=message):
        make_data({"name": "synthetic", "data_dir": "/nonexistent", **extra}, task="segmentation")


@pytest.mark.parametrize("extra, message", [
    (dict(crop_scale=(2.0, 3.0)), r"data\.crop_scale must be \(low, high\) with 0 < low <= high <= 1"),
    (dict(crop_scale=(0, 0)), r"data\.crop_scale must be"),
])
def test_classification_ranges_are_checked(extra, message):
    with pytest.raises(ValueError, match=message):
        make_data({"name": "cifar10", "data_dir": "/nonexistent", **extra}, task="classification")


def test_a_data_set_of_another_task_is_named_before_its_keys():
    # a segmentation config's data section holds ratio_range, which detection data does not take: the task is the
    # mistake, not the key
    with pytest.raises(ValueError, match=r"dataset 'synthetic_detection' is for detection, but task\.name is "
                                         r"'segmentation'; use a detection config"):
        make_data({"name": "synthetic_detection", "ratio_range": (0.5, 2.0)}, task="segmentation")


def test_eval_examples_of_different_sizes_are_named_within_a_batch_only():
    rows = [{"image": np.zeros((32, 48, 3), np.float32), "label": np.zeros((32, 48), np.int32)},
            {"image": np.zeros((40, 48, 3), np.float32), "label": np.zeros((40, 48), np.int32)}]
    with pytest.raises(ValueError, match=r"eval examples of different shapes in one batch \(image: \(32, 48, 3\), "
                                         r"\(40, 48, 3\)\); .* --config\.data\.eval_pad_size"):
        _pad_batch(rows, rows[0], 4)
    # One size per batch (native-size evaluation, one image per batch): each batch pads to its own example's shape
    batch = _pad_batch(rows[1:], rows[0], 2)
    assert batch["image"].shape == (2, 40, 48, 3) and batch["valid"].tolist() == [True, False]
    assert (batch["label"][1] == 255).all()
    assert _pad_batch([], rows[0], 2)["image"].shape == (2, 32, 48, 3)  # all padding: the template's shape


def test_a_synthetic_set_that_cannot_be_written_or_read_is_named(tmp_path):
    below_a_file = tmp_path / "file"
    below_a_file.write_text("")
    with pytest.raises(ValueError, match=r"the synthetic data set cannot be generated into data\.data_dir "
                                         r"'.*/file/sub': Not a directory"):
        make_data({"name": "synthetic", "data_dir": str(below_a_file / "sub"), "num_train": 4, "num_test": 4,
                   "image_size": 16}, task="segmentation")
    config = {"name": "synthetic", "data_dir": str(tmp_path / "data"), "num_train": 4, "num_test": 4,
              "image_size": 16}
    data = make_data(config, task="segmentation")
    (folder,) = {os.path.dirname(p) for p in _files(tmp_path / "data") if "train.array_record" in p}
    for path in _files(folder):
        if "train.array_record" in path:
            os.truncate(path, 1000)  # damaged after it was generated
    data = make_data(config, task="segmentation")
    with pytest.raises(BadRecord, match=f"synthetic:train record 0 cannot be read .*: delete {folder} and it is "
                                        "generated again"):
        data.train_source[0]


def _files(root) -> list[str]:
    return [os.path.join(d, f) for d, _, names in os.walk(root) for f in names]
