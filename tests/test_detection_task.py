"""The detection task: the distillation step with detection targets on 1 and 4 devices, the task following the
student's head, config checks, the dagger student. (The whole detectors against mmdetection itself:
test_mmdet_parity.py.)"""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np
import pytest

from cankd_jax.config_arg import load_config
from cankd_jax.interop import torch as interop
from cankd_jax.train import build
from cankd_jax.train.sharding import batch_sharding, global_batch, make_mesh, replicated
from cankd_jax.train.state import plan_state
from cankd_jax.train.step import make_train_step
from cankd_jax.train.tasks import DetectionTask, make_task
from test_detection_models import K, torch_retinanet

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def _swin_teacher(config) -> None:
    """A narrow Swin + FPN P2-P6 teacher (two blocks per stage: a plain and a shifted window) paired by index
    through CanKD's align form, as configs/coco.py:teacher=mask_rcnn_swin_s pairs it: P3, P4 from P2, P3."""
    config.teacher = ml_collections.ConfigDict(dict(
        name="mask_rcnn_fpn", backbone="swin_tiny", random_init=True, checkpoint="",
        backbone_kwargs=dict(embed_dims=12, depths=(2, 2, 2, 2), num_heads=(1, 2, 3, 6)),
        neck_kwargs=dict(out_channels=config.teacher.neck_kwargs.out_channels)))
    for term, level in zip(config.distill, ("fpn.p2", "fpn.p3")):
        term.loss, term.teacher_feature = "cankd_align", level


def _run(detector: str = "retinanet"):
    """The smoke config's run (narrow RetinaNet, or Faster R-CNN, CanKD on its first two distilled levels against
    a random trunk; 'swin': RetinaNet against `_swin_teacher`) at 64 x 64, built on 1 device, and its state."""
    swin = detector == "swin"
    config = load_config(os.path.join(CONFIGS, "detection_smoke.py"), f"detector={'retinanet' if swin else detector}")
    config.distill = config.distill[:2]
    for net in (config.student, config.teacher):  # one block per stage: what 4 CPU devices compile in seconds
        net.backbone_kwargs.stage_blocks = (1, 1, 1, 1)
    if swin:
        _swin_teacher(config)
    run = build.build_run(config, make_mesh(jax.devices()[:1]), input_size=(64, 64))
    return run, plan_state(run.init_variables, run.tx, 0, make_mesh(jax.devices()[:1])).init()


def _step_on(mesh, run, state):
    """`run`'s step compiled for `mesh`, with (host copies of) `state` and the teacher's variables placed there:
    the step, not the initialisation, is what these tests compare across device counts (initialising in the
    shardings of each mesh is `tests/test_train_step.py`'s)."""
    shardings = plan_state(run.init_variables, run.tx, 0, mesh).shardings
    teacher_shardings = jax.tree.map(lambda _: replicated(mesh), run.teacher_vars)
    step = jax.jit(make_train_step(student=run.student, teacher=run.teacher, terms=run.terms, task=run.task,
                                   tx=run.tx, schedule=run.schedule),
                   in_shardings=(shardings, teacher_shardings, batch_sharding(mesh)),
                   out_shardings=(shardings, replicated(mesh)), donate_argnums=(0,))
    return (step, jax.device_put(jax.tree.map(np.asarray, state), shardings),
            jax.device_put(jax.tree.map(np.asarray, run.teacher_vars), teacher_shardings))


def _batches(n, seed=0):
    r = np.random.default_rng(seed)
    for _ in range(n):
        xy = r.uniform(0, 40, (4, 6, 2))
        boxes = np.concatenate([xy, np.minimum(xy + r.uniform(8, 40, (4, 6, 2)), 64)], -1).astype(np.float32)
        yield {"image": r.standard_normal((4, 64, 64, 3)).astype(np.float32),
               "label": {"boxes": boxes, "labels": r.integers(0, 6, (4, 6)).astype(np.int32),
                         "valid": np.arange(6)[None] < np.array([[3], [0], [6], [1]]),  # one image without objects
                         "img_shape": np.array([[64, 64], [50, 60], [64, 40], [64, 64]], np.float32),
                         "pad_shape": np.array([[64, 64], [64, 64], [64, 64], [64, 64]], np.float32)}}


@pytest.mark.slow  # heavy in-process check: the slow tier keeps the quick one under 5 minutes
# RetinaNet's student steps here inside the 'swin' case (only its teacher differs), so it has no case of its own.
@pytest.mark.parametrize("detector, terms", [("faster_rcnn", ("task/loss_rpn_cls", "task/loss_rpn_bbox",
                                                               "task/loss_cls", "task/loss_bbox", "distill/cankd_p2",
                                                               "distill/cankd_p3")),
                                              ("swin", ("task/loss_cls", "task/loss_bbox", "distill/cankd_p3",
                                                        "distill/cankd_p4")),
                                              ("reppoints", ("task/loss_cls", "task/loss_pts_init",
                                                             "task/loss_pts_refine", "distill/cankd_p3"))])
def test_detection_step_gives_the_same_numbers_on_one_and_four_devices(detector, terms):
    """Three steps on 1 and on 4 devices give the same numbers. Faster R-CNN: its anchors and RoIs are sampled
    with keys of the step and of each image's index in the global batch, so the 4-device step samples what the
    1-device step does. A RetinaNet student against a Swin teacher distilled through the align loss (its windows,
    shifts and upsampled student maps split over devices by image). RepPoints (its deformable convolutions'
    sampling)."""
    history = {}
    run, initial = _run(detector)
    for n in (1, 4):
        mesh = make_mesh(jax.devices()[:n])
        step, state, teacher_vars = _step_on(mesh, run, initial)
        history[n] = []
        with jax.set_mesh(mesh):
            for b in _batches(3):
                state, metrics = step(state, teacher_vars, global_batch(b, mesh))
                history[n].append(jax.device_get(metrics))
    for m1, m4 in zip(history[1], history[4], strict=True):
        assert set(m1) >= set(terms)
        for k in m1:
            # The global gradient norm sums the squares of every parameter's gradient, each the end of a
            # reduction (BatchNorm statistics, RoIAlign's scatter-add) that 4 devices split in another order:
            # float32 rounding of ~1e-7 per element reached 5e-5 of the norm after one Faster R-CNN step and 1.9e-4
            # after three on this 2-core machine (the same on the commit before this tolerance; its losses agree to
            # 2e-5; the cause of the growth is not established: an open item).
            norm_tol = 5e-4 if detector == "faster_rcnn" else 1e-4
            np.testing.assert_allclose(m4[k], m1[k], rtol=norm_tol if k.startswith("grad_norm") else 2e-5, atol=1e-7,
                                       err_msg=k)
    assert history[1][0][terms[1]] > 0 and history[1][-1]["loss"] != history[1][0]["loss"]


def test_task_config_errors_are_named():
    with pytest.raises(ValueError, match="unknown task.detector 'yolo'"):
        make_task(ml_collections.ConfigDict(dict(name="detection", num_classes=3, detector="yolo")))
    with pytest.raises(ValueError, match="unknown task key.*ground_truth"):
        make_task(dict(name="detection", num_classes=3, ground_truth={}))
    with pytest.raises(ValueError, match="has 5 levels but task.strides"):
        DetectionTask(num_classes=3, strides=(8, 16))._levels({"cls_scores": [np.zeros((1, 2, 2, 3))] * 5})
    with pytest.raises(ValueError, match=r"task.train_proposals is \(nms_pre, max_per_img\), two positive counts; "
                                         r"got \(2000,\)"):
        make_task(dict(name="detection", num_classes=3, detector="faster_rcnn", train_proposals=[2000]))
    with pytest.raises(ValueError, match="task.roi_samples must be positive; got 0"):
        make_task(dict(name="detection", num_classes=3, detector="faster_rcnn", roi_samples=0))


@pytest.mark.slow  # heavy: the slow tier keeps the quick one near 5 minutes
def test_faster_rcnn_proposal_and_roi_counts_come_from_the_task():
    """mmdet's counts by default (2000 / 1000 proposals in training, 1000 / 1000 at test, 512 RoIs per image);
    `train_proposals`, `test_proposals` and `roi_samples` set them (configs/detection_demo.py scales them down)."""
    import jax.numpy as jnp

    config = load_config(os.path.join(CONFIGS, "detection_smoke.py"), "detector=faster_rcnn")
    run = build.build_run(config, make_mesh(jax.devices()[:1]), input_size=(64, 64), abstract_teacher=True)
    assert (run.task.train_proposals, run.task.test_proposals, run.task.roi_samples) == ((2000, 1000), (1000, 1000),
                                                                                         512)
    student = run.student
    batch = next(_batches(1))
    x, labels = jnp.asarray(batch["image"]), jax.tree.map(jnp.asarray, batch["label"])
    variables = student.init(jax.random.key(0), x, train=False)
    for counts in (dict(train_proposals=(40, 20), test_proposals=(30, 12), roi_samples=16), {}):
        task = make_task(dict(config.task, **counts)).for_detector(student, config.task)
        train_kw = task.apply_kwargs(labels, train=True, key=jax.random.key(1))
        out = jax.eval_shape(lambda v: student.apply(v, x, train=True, mutable=["batch_stats"], **train_kw)[0],
                             variables)
        test_out = jax.eval_shape(lambda v: student.apply(v, x, train=False, **task.apply_kwargs(labels, train=False)),
                                  variables)
        b = x.shape[0]
        assert out["roi_samples"].labels.shape == (b, counts.get("roi_samples", 512))
        assert out["roi_cls_scores"].shape[0] == b * counts.get("roi_samples", 512)
        assert test_out["proposals"].boxes.shape == (b, counts.get("test_proposals", (0, 1000))[1], 4)
    # The training proposals' count shows in what the sampler can fill: 64 RoI slots, of which at most the 20
    # proposals and the image's ground truths are candidates; mmdet's 1000 proposals fill them all.
    num_gt = np.asarray(labels["valid"]).sum(1)
    for train_proposals, expect in (((40, 20), np.minimum(64, 20 + num_gt)), ((2000, 1000), np.full_like(num_gt, 64))):
        task = make_task(dict(config.task, train_proposals=train_proposals, roi_samples=64)).for_detector(
            student, config.task)
        samples = jax.jit(lambda v: student.apply(v, x, train=True, mutable=["batch_stats"], **task.apply_kwargs(
            labels, train=True, key=jax.random.key(1)))[0]["roi_samples"])(variables)
        filled = np.asarray(samples.valid).sum(1)
        assert (filled <= expect).all() and (filled == expect).any(), (train_proposals, filled, expect)


def test_task_follows_the_student_head():
    """norm_on_bbox and the strides have one source, the student: the task takes them from it, and a config that
    names other values (or the other detector) is refused with the key to drop."""
    from cankd_jax.train.sharding import make_mesh

    def run(arg, **task):
        config = load_config(os.path.join(CONFIGS, "detection_smoke.py"), arg)
        if arg == "detector=fcos":
            config.student.head_kwargs.norm_on_bbox = False  # not the task's default (True)
        config.task.update(task)
        return build.build_run(config, make_mesh(jax.devices()[:1]), input_size=(64, 64), abstract_teacher=True)

    fcos_task = run("detector=fcos").task
    assert (fcos_task.norm_on_bbox, fcos_task.strides) == (False, (8, 16, 32, 64, 128))  # the head's, not True
    assert run("detector=fcos", norm_on_bbox=False).task.norm_on_bbox is False
    with pytest.raises(ValueError, match=r"task.norm_on_bbox=True but the student has norm_on_bbox=False.*drop "
                                         r"task.norm_on_bbox"):
        run("detector=fcos", norm_on_bbox=True)
    with pytest.raises(ValueError, match=r"task.strides=\(8, 16\) but the student has strides=\(8, 16, 32, 64, 128\)"):
        run("detector=fcos", strides=(8, 16))
    with pytest.raises(ValueError, match="task.detector='fcos' but the student's head is a RetinaHead; set "
                                         "task.detector to 'retinanet'"):
        run("detector=retinanet", detector="fcos")
    # DINO: the matching queries are the student's; the denoising queries are the task's own setting
    dino_task = run("detector=dino").task
    assert (dino_task.num_queries, dino_task.dn_queries, dino_task.strides) == (30, 10, (8, 16, 32, 64))
    with pytest.raises(ValueError, match=r"task.num_queries=900 but the student has num_queries=30"):
        run("detector=dino", num_queries=900)
    with pytest.raises(ValueError, match="task.detector='retinanet' but the student's network is a DINO; set "
                                         "task.detector to 'dino'"):
        run("detector=dino", detector="retinanet")


def test_dagger_student_takes_neck_and_head_from_the_teacher_and_the_backbone_from_imagenet(tmp_path):
    from flax import traverse_util

    from cankd_jax import models
    from cankd_jax.train.weights import load_pretrained
    from test_detection_models import BACKBONE, FPN_CH, HEAD_CH, STACKED

    teacher_sd = {k: v.numpy() for k, v in torch_retinanet(seed=5).state_dict().items()}
    imagenet = {k[len("backbone."):]: v.numpy() for k, v in torch_retinanet(seed=6).state_dict().items()
                if k.startswith("backbone.")}
    imagenet["fc.weight"] = np.zeros((10, 256), np.float32)  # an ImageNet head: reported, not loaded
    interop.save_pth(teacher_sd, str(tmp_path / "teacher.pth"))
    interop.save_pth(imagenet, str(tmp_path / "r50.pth"))
    cfg = ml_collections.ConfigDict(dict(
        name="retinanet", backbone="resnet50", backbone_kwargs=BACKBONE, neck_kwargs=dict(out_channels=FPN_CH),
        head_kwargs=dict(feat_channels=HEAD_CH, stacked_convs=STACKED), pretrained=str(tmp_path / "r50.pth"),
        inherit="teacher"))
    student = models.make_network(cfg, num_classes=K)
    sample = np.zeros((1, 64, 64, 3), np.float32)
    loaded = load_pretrained(cfg, student, sample, teacher_cfg=ml_collections.ConfigDict(
        dict(checkpoint=str(tmp_path / "teacher.pth"))))
    init = jax.eval_shape(lambda: student.init(jax.random.key(0), sample, train=False))
    flat = traverse_util.flatten_dict(jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), init))
    assert set(loaded) == set(flat)  # backbone from one file, neck and head from the other: everything
    exported = interop.export_state_dict(student, traverse_util.unflatten_dict({**flat, **loaded}))
    for key, value in exported.items():
        expected = imagenet[key[len("backbone."):]] if key.startswith("backbone.") else teacher_sd[key]
        np.testing.assert_array_equal(value, expected, err_msg=key)
    with pytest.raises(ValueError, match="teacher.checkpoint is empty"):
        load_pretrained(cfg, student, sample, teacher_cfg=ml_collections.ConfigDict(dict(checkpoint="")))
