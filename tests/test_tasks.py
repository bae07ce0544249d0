"""Task losses and metrics against PyTorch / mmseg's definitions; student initialisation from a .pth."""

from __future__ import annotations

import logging

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cankd_jax import models
from cankd_jax.interop.torch import export_state_dict, save_pth
from cankd_jax.train.tasks import SegmentationTask, make_task
from cankd_jax.train.weights import load_pretrained
from cankd_jax.train.tasks import confusion_matrix, mean_iou, segmentation_cross_entropy


def _case(seed=0, k=5):
    r = np.random.default_rng(seed)
    logits = r.standard_normal((2, 6, 7, k)).astype(np.float32) * 3
    labels = r.integers(0, k, (2, 6, 7))
    labels[r.random(labels.shape) < 0.3] = 255
    return logits, labels


@pytest.mark.parametrize("avg_non_ignore", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_segmentation_cross_entropy_is_mmsegs(avg_non_ignore, weighted):
    torch = pytest.importorskip("torch")
    logits, labels = _case()
    weight = [0.2, 1.0, 2.0, 0.5, 1.5] if weighted else None
    ours = segmentation_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), avg_non_ignore=avg_non_ignore,
                                      class_weight=weight)
    # mmseg: F.cross_entropy(weight, reduction='none', ignore_index=255), then a plain mean (over every pixel,
    # or over the labelled ones with avg_non_ignore); the class weights are not renormalised.
    per_pixel = torch.nn.functional.cross_entropy(
        torch.from_numpy(logits).permute(0, 3, 1, 2), torch.from_numpy(labels),
        weight=None if weight is None else torch.tensor(weight), reduction="none", ignore_index=255)
    ref = per_pixel.sum() / ((labels != 255).sum() if avg_non_ignore else labels.size)
    np.testing.assert_allclose(float(ours), float(ref), rtol=1e-6)


def test_class_weight_must_cover_every_class():
    with pytest.raises(ValueError, match="class_weight has 2 entries for task.num_classes=3"):
        SegmentationTask(num_classes=3, class_weight=(1.0, 2.0))
    with pytest.raises(ValueError, match="unknown task key.*class_weights"):
        make_task(ml_collections.ConfigDict(dict(name="segmentation", num_classes=3, class_weights=(1, 1, 1))))


def test_mean_iou_follows_mmseg():
    r = np.random.default_rng(1)
    labels = r.integers(0, 4, (3, 9, 9))
    labels[0, :2] = 255
    preds = np.where(r.random(labels.shape) < 0.6, labels % 255, r.integers(0, 4, labels.shape))
    preds[preds == 3] = 2  # class 3 never predicted: IoU 0, still counted
    valid = np.array([True, True, False])  # the padded example of an eval batch
    cm = np.asarray(confusion_matrix(jnp.asarray(preds), jnp.asarray(labels), jnp.asarray(valid)[:, None, None], 5))
    miou, iou = mean_iou(cm)
    keep = (labels != 255) & valid[:, None, None]
    expected = []
    for c in range(5):
        inter = np.sum((preds == c) & (labels == c) & keep)
        union = np.sum(((preds == c) | (labels == c)) & keep)
        expected.append(inter / union if union else np.nan)
    np.testing.assert_allclose(iou, expected)
    assert np.isnan(iou[4]) and iou[3] == 0.0
    assert miou == pytest.approx(np.nanmean(expected))


def _host_random_variables(network, x, seed):
    """Distinct random values for every variable of `network`, drawn on the host (no compile)."""
    abstract = jax.eval_shape(lambda: network.init(jax.random.key(0), x, train=False))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(a.dtype), abstract)


def test_student_starts_from_a_pretrained_backbone(tmp_path, caplog):
    size = jnp.zeros((1, 32, 32, 3))
    kw = dict(base_width=8, stem_width=8)
    backbone = models.make_model("resnet18_v1c_d8", **kw)
    bb_vars = _host_random_variables(backbone, size, 3)
    path = str(tmp_path / "r18.pth")
    state = export_state_dict(backbone, bb_vars)
    state["fc.weight"] = np.zeros((10, 64), np.float32)  # an ImageNet head: reported, not loaded
    save_pth(state, path)
    cfg = ml_collections.ConfigDict(dict(name="fcn", backbone="resnet18_v1c_d8", backbone_kwargs=kw, pretrained=path))
    student = models.make_network(cfg, num_classes=3)
    with caplog.at_level(logging.INFO, logger="cankd_jax.train.weights"):
        loaded = load_pretrained(cfg, student, size)
    assert any("fc.weight" in r.getMessage() for r in caplog.records)
    flat = {k: v for k, v in jax.tree_util.tree_flatten_with_path(bb_vars)[0]}
    assert len(loaded) == len(flat)
    for (collection, *rest), value in loaded.items():
        assert rest[0] == "backbone"
        key = next(k for k in flat if [getattr(p, "key", None) for p in k] == [collection, *rest[1:]])
        np.testing.assert_array_equal(value, flat[key])

    with pytest.raises(FileNotFoundError, match="student.pretrained"):
        load_pretrained(ml_collections.ConfigDict(dict(cfg.to_dict(), pretrained=str(tmp_path / "x.pth"))),
                        student, size)
    with pytest.raises(ValueError, match="no key matched"):
        load_pretrained(ml_collections.ConfigDict(dict(cfg.to_dict(), pretrained_prefixes=[("backbone.", "model.")])),
                        student, size)


def test_the_run_initialises_the_student_from_pretrained(tmp_path):
    import os

    from cankd_jax.config_arg import load_config
    from cankd_jax.train.build import build_run
    from cankd_jax.train.sharding import make_mesh
    from cankd_jax.train.state import plan_state

    cfg = load_config(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "smoke.py"))
    backbone = models.make_model(cfg.student.backbone, **cfg.student.backbone_kwargs)
    bb_vars = _host_random_variables(backbone, jnp.zeros((1, 32, 32, 3)), 7)
    path = str(tmp_path / "bb.pth")
    save_pth(export_state_dict(backbone, bb_vars), path)
    cfg.student.pretrained = path
    cfg.distill = []  # the student alone: no teacher to build
    run = build_run(cfg, make_mesh(), input_size=(32, 32))
    state = plan_state(run.init_variables, run.tx, cfg.seed, make_mesh()).init()
    params, stats = jax.device_get((state.params, state.batch_stats))
    chex.assert_trees_all_equal(params["student"]["backbone"], bb_vars["params"])
    chex.assert_trees_all_equal(stats["student"]["backbone"], bb_vars["batch_stats"])
    assert "decode_head" in params["student"]  # the heads keep their own initialisation
