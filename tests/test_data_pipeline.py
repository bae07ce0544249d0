"""Grain train/eval iterators: resumable, sharded, deterministic; the config facade; TFDS mock data."""

from __future__ import annotations

import json
import os

import grain.python as grain
import numpy as np
import pytest
import tensorflow_datasets as tfds

from cankd_jax.data import (
    eval_batch_count,
    make_data,
    make_eval_iterator,
    make_train_iterator,
    per_process_batch_size,
)


class _IdSource:
    """Record i: a 2x2 image of value i and label i, so batches reveal which examples they hold."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"image": np.full((2, 2, 3), i, np.uint8), "label": np.int32(i)}

    def __repr__(self):
        return f"_IdSource({self.n})"


def _noisy(record, rng):
    """Keeps the id and adds an augmentation draw, so a replay must reproduce the random stream too."""
    return {"id": record["label"], "draw": rng.random(), "image": record["image"].astype(np.float32)}


def _ids(batch):
    return batch["id"].tolist()


def _all_ids(batches):
    return [i for b in batches for i in _ids(b)]


def _take(iterator, k):
    return [next(iterator) for _ in range(k)]


def _assert_same_batches(xs, ys):
    for x, y in zip(xs, ys, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def _concat(parts):
    """Per-process row blocks of the same global batches -> the global batches."""
    return [{k: np.concatenate([p[k] for p in step]) for k in step[0]} for step in zip(*parts, strict=True)]


def test_restored_iterator_continues_exactly():
    kwargs = dict(global_batch_size=3, seed=5)
    straight = make_train_iterator(_IdSource(10), _noisy, **kwargs)
    _take(straight, 4)  # crosses an epoch boundary (12 > 10)
    state = straight.get_state()
    assert state["global_batches"] == 4
    state = json.loads(json.dumps(state))  # what a JSON checkpoint item gives back
    expected = _take(straight, 6)
    _assert_same_batches(_take(make_train_iterator(_IdSource(10), _noisy, state=state, **kwargs), 6), expected)
    # Also when the state is set on a running iterator.
    other = make_train_iterator(_IdSource(10), _noisy, **kwargs)
    _take(other, 1)
    other.set_state(state)
    _assert_same_batches(_take(other, 6), expected)


def test_shuffling_is_seeded_and_an_epoch_is_a_permutation():
    a = _take(make_train_iterator(_IdSource(20), _noisy, global_batch_size=4, seed=1), 10)
    b = _take(make_train_iterator(_IdSource(20), _noisy, global_batch_size=4, seed=1), 10)
    c = _take(make_train_iterator(_IdSource(20), _noisy, global_batch_size=4, seed=2), 10)
    _assert_same_batches(a, b)
    assert [_ids(x) for x in a] != [_ids(x) for x in c]
    assert sorted(_all_ids(a[:5])) == sorted(_all_ids(a[5:])) == list(range(20))
    assert _all_ids(a[:5]) != _all_ids(a[5:])  # each epoch its own order


@pytest.mark.parametrize("splits", [2, 4])
def test_processes_read_their_rows_of_the_same_global_batches(splits):
    """The order is a function of the global step: any split of the rows reassembles the one-process batches."""
    n, batch, steps = 22, 8, 7  # 56 examples: crosses two epoch boundaries, 22 not a multiple of the batch
    single = _take(make_train_iterator(_IdSource(n), _noisy, global_batch_size=batch, seed=3), steps)
    rows = batch // splits
    parts = [_take(make_train_iterator(_IdSource(n), _noisy, global_batch_size=batch, seed=3,
                                       rows=(i * rows, (i + 1) * rows)), steps) for i in range(splits)]
    _assert_same_batches(_concat(parts), single)  # ids and augmentation draws alike


def test_a_position_saved_on_one_topology_resumes_on_another():
    one = make_train_iterator(_IdSource(16), _noisy, global_batch_size=4, seed=0)
    _take(one, 3)
    state = one.get_state()
    expected = _take(one, 4)
    parts = [_take(make_train_iterator(_IdSource(16), _noisy, global_batch_size=4, seed=0, rows=(2 * i, 2 * i + 2),
                                       state=state), 4) for i in range(2)]
    _assert_same_batches(_concat(parts), expected)
    for key, value in (("global_batch_size", 8), ("seed", 1)):
        kwargs = {"global_batch_size": 4, "seed": 0, key: value}
        with pytest.raises(ValueError, match=f"saved with {key}="):
            make_train_iterator(_IdSource(16), _noisy, state=state, **kwargs)


def test_bad_rows_and_states_are_named():
    with pytest.raises(ValueError, match="rows .* global batch of 4"):
        make_train_iterator(_IdSource(8), _noisy, global_batch_size=4, seed=0, rows=(2, 6))
    with pytest.raises(ValueError, match="not a data-iterator state"):
        make_train_iterator(_IdSource(8), _noisy, global_batch_size=4, seed=0, state={"examples": 3})


@pytest.mark.slow  # heavy in-process check: the slow tier keeps the quick one under 5 minutes
def test_worker_processes_give_the_same_batches_and_resume_across_worker_counts():
    """Pins what we rely on from Grain: in-order delivery with workers, and the sampler's generator reaching
    the augmentation."""
    kwargs = dict(global_batch_size=4, seed=1, rows=(1, 3))
    in_process = make_train_iterator(_IdSource(20), _noisy, **kwargs)
    expected = _take(in_process, 7)
    workers = make_train_iterator(_IdSource(20), _noisy, worker_count=2, **kwargs)
    _assert_same_batches(_take(workers, 3), expected[:3])
    state = workers.get_state()
    _assert_same_batches(_take(workers, 2), expected[3:5])
    _assert_same_batches(_take(make_train_iterator(_IdSource(20), _noisy, state=state, **kwargs), 4), expected[3:])
    _assert_same_batches(_take(make_train_iterator(_IdSource(20), _noisy, state=state, worker_count=3, **kwargs), 4),
                         expected[3:])
    evals = list(make_eval_iterator(_IdSource(11), lambda r: r, batch_size=4, worker_count=2,
                                    shard_options=grain.ShardOptions(0, 1)))
    assert [b["label"][b["valid"]].tolist() for b in evals] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]


@pytest.mark.parametrize("n,batch,shards", [(11, 4, 1), (11, 4, 3), (10, 5, 2), (2, 3, 3)])
def test_eval_visits_every_example_once(n, batch, shards):
    seen, counts = [], []
    for i in range(shards):
        batches = list(make_eval_iterator(_IdSource(n), lambda r: r, batch_size=batch,
                                          shard_options=grain.ShardOptions(i, shards)))
        counts.append(len(batches))
        for b in batches:
            assert b["image"].shape == (batch, 2, 2, 3) and b["valid"].shape == (batch,)
            seen += b["label"][b["valid"]].tolist()
            assert np.all(b["label"][~b["valid"]] == 255) and np.all(b["image"][~b["valid"]] == 0)
    assert sorted(seen) == list(range(n))
    assert counts == [eval_batch_count(n, batch, shards)] * shards  # same count everywhere


def test_per_process_batch_size():
    assert per_process_batch_size(8, 2) == 4
    with pytest.raises(ValueError, match="multiple of the 3 processes"):
        per_process_batch_size(8, 3)


# --- the config facade on the synthetic set -------------------------------------------------------------


SMOKE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "smoke.py")
SYNTH = dict(name="synthetic", image_size=32, num_train=40, num_test=10, crop_size=(24, 24), scale=(32, 32),
             ratio_range=(0.75, 1.5), eval_batch_size=4, workers=0)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_data(dict(SYNTH, data_dir=str(tmp_path_factory.mktemp("tfds"))), task="segmentation")


def test_synthetic_train_batches_and_resume(synth):
    assert synth.input_size == (24, 24) and synth.num_classes == 7
    it = synth.train_iterator(4, seed=0)
    first = next(it)
    assert first["image"].shape == (4, 24, 24, 3) and first["image"].dtype == np.float32
    assert first["label"].shape == (4, 24, 24) and first["label"].dtype == np.int32
    assert set(np.unique(first["label"])) <= set(range(7)) | {255}
    _take(it, 2)
    state = it.get_state()
    expected = _take(it, 3)
    _assert_same_batches(_take(synth.train_iterator(4, seed=0, state=state), 3), expected)
    # The set's identity is kept: another synthetic set of the same length (another image size) is refused,
    # which its length alone let through; a state saved before identities were kept resumes as before.
    assert state["dataset"] == "synthetic:train(image_size=32,num_train=40,synthetic_seed=0)"
    other = dict(state, dataset=state["dataset"].replace("image_size=32", "image_size=48"))
    with pytest.raises(ValueError, match=r"saved on data set synthetic:train\(image_size=48,.*this run reads "
                                         r"synthetic:train\(image_size=32"):
        synth.train_iterator(4, seed=0, state=other)
    older = {k: v for k, v in state.items() if k != "dataset"}
    _assert_same_batches(_take(synth.train_iterator(4, seed=0, state=older), 3), expected)


def test_synthetic_eval_covers_the_test_split(synth):
    batches = list(synth.eval_iterator(batch_size=4, shard_options=grain.ShardOptions(0, 1)))
    assert len(batches) == 3 and sum(int(b["valid"].sum()) for b in batches) == 10
    assert batches[0]["image"].shape == (4, 32, 32, 3) and batches[0]["label"].dtype == np.int32


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown data config key.*'crop'"):
        make_data(dict(SYNTH, crop=(3, 3)))
    with pytest.raises(ValueError, match="is for segmentation, but task.name is 'classification'"):
        make_data(dict(SYNTH, data_dir=str(tmp_path)), task="classification")
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        make_data({"name": "mnist"})


def test_splits_and_unset_sizes_can_be_set_on_the_command_line(tmp_path, monkeypatch):
    """`--config.data.train_split` / `eval_split` (a TFDS split or slice) and a size the config leaves unset reach
    the data, through the flag parser `train.py` uses; a split the set lacks is named with the ones it has."""
    from absl import flags  # noqa: PLC0415
    from ml_collections import config_flags  # noqa: PLC0415

    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True)
    argv = ["train.py", f"--config={SMOKE}", f"--config.data.data_dir={tmp_path}",
            "--config.data.train_split=train[:40]", "--config.data.eval_split=train[60:]",
            "--config.data.eval_pad_size=(48, 40)"]
    monkeypatch.setattr("sys.argv", argv)  # config_flags reads the overrides from sys.argv
    values(argv)
    data = make_data(values.config.data, task="segmentation")
    assert (len(data.train_source), len(data.eval_source)) == (40, 4)  # the smoke set: 64 train, 16 test images
    batch = next(data.eval_iterator(shard_options=grain.ShardOptions(0, 1)))
    assert batch["image"].shape[1:3] == (48, 40)
    assert data.identity.startswith("synthetic:train[:40](")
    with pytest.raises(ValueError, match=r"dataset 'synthetic' cannot read split 'val' .*it has train, test"):
        make_data(dict(values.config.data, eval_split="val"), task="segmentation")


def test_missing_dataset_is_a_one_line_error_naming_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        make_data({"name": "cityscapes", "data_dir": str(tmp_path)})
    message = str(info.value)
    assert "\n" not in message
    assert f"dataset 'cityscapes' not found under {tmp_path}" in message
    assert "manual download" in message and "https://www.tensorflow.org/datasets/catalog/cityscapes" in message
    assert "--config.data.data_dir" in message


# --- TFDS catalogue datasets through tfds.testing.mock_data ----------------------------------------------


def test_mock_cifar10_classification():
    with tfds.testing.mock_data(num_examples=12):
        data = make_data({"name": "cifar10", "data_dir": "/nonexistent", "eval_batch_size": 5}, task="classification")
        batch = next(data.train_iterator(4, seed=0))
        evals = list(data.eval_iterator(shard_options=grain.ShardOptions(0, 1)))
    assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (4,) and batch["label"].dtype == np.int32
    assert np.all((batch["label"] >= 0) & (batch["label"] < 10))
    assert len(evals) == 3 and sum(int(b["valid"].sum()) for b in evals) == 12


def _paired_segmentation_mock(image_key: str, label_key: str, label_channels: int, label_high: int, n: int):
    """`tfds.testing.mock_data` serving `n` random segmentation examples whose label map has its image's size
    (the default mock draws each feature's size on its own, a pair the pipeline refuses) and values in
    [0, label_high]."""

    class Source:
        def __init__(self, split: str):
            self.split = split

        def __len__(self) -> int:
            return n

        def __getitem__(self, i: int) -> dict:
            rng = np.random.default_rng([int(i), len(self.split)])
            h, w = (int(x) for x in rng.integers(12, 40, 2))
            return {image_key: rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
                    label_key: rng.integers(0, label_high + 1, (h, w, label_channels), dtype=np.uint8)}

    return tfds.testing.mock_data(as_data_source_fn=lambda builder, split, **kwargs: Source(split))


def test_mock_scene_parse150_reduces_zero_label():
    # The red channel holds class + 1 (0: unlabelled) of the 100 classes.
    with _paired_segmentation_mock("image", "annotation", 3, label_high=100, n=4):
        data = make_data({"name": "ade20k", "data_dir": "/nonexistent", "crop_size": (16, 16), "scale": (32, 16),
                          "eval_scale": (16, 16), "eval_batch_size": 4}, task="segmentation")
        raw = tfds.data_source("scene_parse150", split="train")[0]
        record = data.train_source[0]
        batch = next(data.train_iterator(2, seed=0))
        evals = list(data.eval_iterator(shard_options=grain.ShardOptions(0, 1)))
    assert data.num_classes == 100
    assert record["label"].shape == record["image"].shape[:2] and record["label"].dtype == np.uint8
    red = raw["annotation"][..., 0]
    assert set(np.unique(record["label"])) <= ({255} if (red == 0).any() else set()) | set(np.unique(red[red > 0]) - 1)
    assert batch["image"].shape == (2, 16, 16, 3) and batch["label"].shape == (2, 16, 16)
    assert evals[0]["image"].shape == (4, 16, 16, 3)


def test_mock_cityscapes_maps_label_ids_to_train_ids():
    with _paired_segmentation_mock("image_left", "segmentation_label", 1, label_high=40, n=2):
        data = make_data({"name": "cityscapes", "data_dir": "/nonexistent", "crop_size": (16, 32),
                          "scale": (64, 32), "eval_scale": (64, 32), "eval_batch_size": 2}, task="segmentation")
        raw = tfds.data_source("cityscapes", split="train")[0]
        record = data.train_source[0]
        batch = next(data.train_iterator(2, seed=0))
    ids = raw["segmentation_label"][..., 0]
    expected = np.full(ids.shape, 255, np.uint8)
    for label_id, train_id in {7: 0, 8: 1, 26: 13, 33: 18}.items():
        expected[ids == label_id] = train_id
    sample = np.isin(ids, [7, 8, 26, 33]) | ~np.isin(ids, [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26,
                                                          27, 28, 31, 32, 33])
    np.testing.assert_array_equal(record["label"][sample], expected[sample])
    assert batch["image"].shape == (2, 16, 32, 3) and batch["label"].shape == (2, 16, 32)
