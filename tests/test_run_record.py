"""The run record a checkpoint keeps: the teacher's fingerprint (the same for the same weights on any topology,
another for one changed bit) and what a resume does with a changed teacher or config."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import ml_collections
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cankd_jax.train import run_record


def _weights(seed=0):
    r = np.random.default_rng(seed)
    return {"params": {"conv": {"kernel": r.standard_normal((3, 3, 4, 8)).astype(np.float32),
                                "bias": r.standard_normal((8,)).astype(np.float32)},
                       "embed": r.standard_normal((6, 4)).astype(np.float32)},
            "batch_stats": {"mean": r.standard_normal((8,)).astype(np.float32)}}


def _placed(tree, mesh, spec_of):
    return jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, spec_of(x))), tree)


def test_the_fingerprint_is_the_weights_not_their_placement():
    host = _weights()
    digest = run_record.fingerprint(host)
    assert len(digest) == 32 and run_record.fingerprint(jax.tree.map(jnp.asarray, host)) == digest
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "fsdp"))
    replicated = _placed(host, mesh, lambda x: PartitionSpec())
    spread = _placed(host, mesh, lambda x: PartitionSpec(*((None, None, "fsdp", "data") if x.ndim == 4 else
                                                           ("data",) if x.shape[0] % 2 == 0 else ())))
    assert any(len(s.index) and s.data.shape != x.shape
               for x in jax.tree.leaves(spread) for s in x.addressable_shards)  # really split
    assert run_record.fingerprint(replicated) == digest and run_record.fingerprint(spread) == digest
    assert run_record.fingerprint(None) is None and run_record.fingerprint({}) is None  # no teacher


def test_the_fingerprint_of_given_weights_never_changes():
    """Checkpoints keep the digest of their teacher, and a resume compares it: a change to how digests are computed
    would refuse every existing workdir. The value is what the first recording code (commit 0c67a95) gave."""
    assert run_record.fingerprint(_weights()) == "55db304dee2474fc6c1b434a3a537dbf"


def test_a_record_hashes_each_array_once_for_the_check_and_the_fingerprint(monkeypatch):
    """The start of a multi-process run compares the teacher across processes and fingerprints it: a replicated
    array is hashed once for both (a 60M-parameter teacher takes about 3 s a pass), a spread one once per piece.
    Here as process 0 of 2 whose partner holds nothing, so that the comparison really runs in one process."""
    from jax.experimental import multihost_utils

    host = _weights()
    expected = run_record.fingerprint(host)
    mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
    replicated = _placed(host, mesh, lambda x: PartitionSpec())
    spread = _placed(host, mesh, lambda x: PartitionSpec("data") if x.shape[0] % 4 == 0 else PartitionSpec())
    assert any(x.sharding.spec != PartitionSpec() for x in jax.tree.leaves(spread))
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "process_allgather", lambda x: np.stack([np.asarray(x), np.zeros_like(x)]))
    calls = []
    words = run_record._words
    monkeypatch.setattr(run_record, "_words", lambda data, *a: calls.append(data.size) or words(data, *a))
    for placed in (replicated, spread):
        calls.clear()
        assert run_record.make_record(ml_collections.ConfigDict(), placed, check=True)["teacher"] == expected
        # each first copy of a piece once; a whole copy only where it is not one (the first whole shard)
        assert calls == [s.data.size for x in jax.tree.leaves(placed) for s in x.addressable_shards
                         if s.replica_id == 0 or (s.data.shape == x.shape and s is x.addressable_shards[0])]


@pytest.mark.parametrize("change", ["one ulp", "two swapped", "two signs flipped", "negated", "renamed", "bfloat16",
                                    "float64 high bits", "float8 zero's sign", "other seed"])
def test_any_change_to_the_weights_changes_the_fingerprint(change):
    base = _weights()
    other = jax.tree.map(np.copy, base)
    kernel = other["params"]["conv"]["kernel"].reshape(-1)
    if change == "one ulp":
        kernel[17] = np.nextafter(kernel[17], np.float32(np.inf))
    elif change == "two swapped":
        kernel[[3, 40]] = kernel[[40, 3]]
    elif change == "two signs flipped":  # a sum linear in the sign bit would miss this
        kernel[[5, 9]] *= -1
    elif change == "negated":
        other["params"]["conv"]["kernel"] *= -1
    elif change == "renamed":
        other["params"]["embedding"] = other["params"].pop("embed")
    elif change == "bfloat16":
        other["params"]["embed"] = other["params"]["embed"].astype(jnp.bfloat16)
    elif change == "float64 high bits":  # host arrays may be float64: a change only above the low 32 bits counts
        base["batch_stats"]["mean"] = np.arange(8, dtype=np.float64)
        other["batch_stats"]["mean"] = np.arange(8, dtype=np.float64)
        other["batch_stats"]["mean"][2] = 3.0  # 2.0 and 3.0 share their low 32 bits (all zero)
    elif change == "float8 zero's sign":  # bits, not values: float8_e4m3fn is numpy kind 'V', not 'f'
        base["batch_stats"]["scale"] = np.zeros(4, ml_dtypes.float8_e4m3fn)
        other["batch_stats"]["scale"] = -np.zeros(4, ml_dtypes.float8_e4m3fn)
    else:
        other = _weights(seed=1)
    assert run_record.fingerprint(other) != run_record.fingerprint(base)


def _record(teacher_seed=0, **config):
    base = dict(seed=0, total_steps=8, log_every=1, optimizer=dict(lr=0.01, momentum=0.9),
                mesh=dict(fsdp=False), data=dict(data_dir="/a", scale=(512, 1024)))
    for key, value in config.items():
        node = base
        *path, last = key.split("__")
        for p in path:
            node = node[p]
        node[last] = value
    return run_record.make_record(ml_collections.ConfigDict(base), _weights(teacher_seed))


def test_a_resume_with_other_teacher_weights_is_refused():
    with pytest.raises(run_record.TeacherChanged, match=r"the checkpoint at step 4 in /w/checkpoints was distilled "
                                                        r"from other teacher weights.*new --workdir"):
        run_record.check_resume(_record(), _record(teacher_seed=1), step=4, where="/w/checkpoints")
    no_teacher = dict(_record(), teacher=None)  # a student trained alone: nothing to compare
    assert run_record.check_resume(no_teacher, _record(teacher_seed=1), step=4, where="w") == []


def test_a_resume_with_changed_settings_names_each_and_the_schedule(caplog):
    saved = _record()
    with caplog.at_level(logging.WARNING, logger=run_record.__name__):
        changed = run_record.check_resume(saved, _record(total_steps=16, optimizer__lr=0.02), step=4, where="w")
    assert changed == ["optimizer.lr: 0.01 -> 0.02", "total_steps: 8 -> 16"]
    assert "resuming step 4 with 2 setting(s) changed" in caplog.text
    assert "the learning-rate schedule is drawn for the new total_steps" in caplog.text
    # How often to log, the device layout and where the data lie change no number: not reported
    assert run_record.check_resume(saved, _record(log_every=5, mesh__fsdp=True, data__data_dir="/b"), step=4,
                                   where="w") == []
    assert run_record.check_resume(saved, _record(data__scale=[512, 1024]), step=4, where="w") == []  # JSON lists
    assert run_record.check_resume(None, _record(seed=3), step=4, where="w") == []  # a checkpoint before records


def test_a_record_from_before_whole_data_sections_resumes_without_a_reported_change(caplog):
    """A checkpoint written when configs named only some data keys: the keys it lacks held their defaults then,
    so a config whose section now writes them all out reports nothing; a key set to another value still shows."""
    from cankd_jax.data.options import data_section

    old = dict(name="cityscapes", data_dir="", crop_size=(512, 1024), scale=(2048, 1024), eval_batch_size=8)
    saved = run_record.make_record(ml_collections.ConfigDict(dict(seed=0, data=old)), None)
    now = dict(seed=0, data=data_section("cityscapes", crop_size=(512, 1024), scale=(2048, 1024), eval_batch_size=8))
    assert len(now["data"]) > len(old) + 8
    full = run_record.make_record(ml_collections.ConfigDict(now), None)
    assert run_record.check_resume(saved, full, step=4, where="w") == []
    assert run_record.check_resume(full, saved, step=4, where="w") == []  # a hand-written section now: the same
    now["data"].update(flip_prob=0.0, eval_pad_size=(1024, 2048))
    changed = run_record.check_resume(saved, run_record.make_record(ml_collections.ConfigDict(now), None), step=4,
                                      where="w")
    assert changed == ["data.eval_pad_size: [] -> [1024, 2048]", "data.flip_prob: 0.5 -> 0.0"]


def test_config_differences_name_list_items_and_take_nan_as_nan():
    from cankd_jax.train.distributed import config_differences, flat_config

    def config(weight, lr):
        return ml_collections.ConfigDict(dict(optimizer=dict(lr=lr), scale=(512, 1024),
                                              distill=[dict(name="p3", weight=1.0), dict(name="p4", weight=weight)]))

    flat = flat_config(config(1.0, 0.01))
    assert flat["distill[1].weight"] == 1.0 and flat["scale"] == [512, 1024]
    assert config_differences(flat_config(config(2.0, 0.01)), flat) == ["distill[1].weight: 1.0 -> 2.0"]
    nan = flat_config(config(1.0, float("nan")))
    assert config_differences(nan, flat_config(config(1.0, float("nan")))) == []
    assert config_differences(nan, flat, ignore=("optimizer",)) == []
    assert config_differences(flat_config(config(2.0, 0.01)), flat, ignore=("distill",)) == []


@pytest.mark.parametrize("placement", ["host", "replicated", "spread"])
def test_weights_holding_nan_or_inf_are_refused_naming_the_arrays(placement):
    """A teacher (or initial student) with NaNs would otherwise surface only as a non-finite loss at step 1. Each
    bad element counts once however many devices hold a copy, and an integer array is never 'non-finite'."""
    bad = _weights()
    bad["params"]["conv"]["kernel"][2, 1, 3, 5] = np.nan
    bad["params"]["conv"]["kernel"][0, 0, 0, 0] = -np.inf
    bad["params"]["embed"] = bad["params"]["embed"].astype(jnp.bfloat16)
    bad["params"]["embed"][5, 3] = np.inf
    bad["batch_stats"]["count"] = np.arange(8, dtype=np.int32)
    bad["batch_stats"]["scale"] = np.array([1, np.nan, 2, 3], ml_dtypes.float8_e4m3fn)  # numpy's kind 'V' too
    if placement != "host":
        mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
        bad = _placed(bad, mesh, lambda x: PartitionSpec(*[None] * (x.ndim - 1), "data")  # the NaNs' arrays too
                      if placement == "spread" and x.shape[-1] % 4 == 0 else PartitionSpec())
        assert (placement == "spread") == all(x.sharding.spec != PartitionSpec() for x in jax.tree.leaves(bad))
    expected = (r"the teacher's weights hold NaN or infinite values in 3 of 6 arrays "
                r"\(\['batch_stats'\]\['scale'\]: 1 of 4, \['params'\]\['conv'\]\['kernel'\]: 2 of 288, "
                r"\['params'\]\['embed'\]: 1 of 24\): the weights teacher.checkpoint names are damaged")
    with pytest.raises(run_record.NonFiniteWeights, match=expected):
        run_record.make_record(ml_collections.ConfigDict(), bad, check=True)
    with pytest.raises(run_record.NonFiniteWeights, match=r"the initial student weights hold NaN .* 3 of 6 arrays"):
        run_record.check_weights(bad, "initial student weights", "student.pretrained")
    assert run_record.make_record(ml_collections.ConfigDict(), bad)["teacher"]  # unchecked: fingerprinted only
    run_record.check_weights(_weights(), "initial student weights", "student.pretrained")  # finite: no error
