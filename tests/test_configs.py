"""Every shipped config builds: its networks exist, each distillation term reads features that both
networks produce, and the channel counts line up through the connector (checked by shape, no compile)."""

from __future__ import annotations

import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cankd_jax import models
from cankd_jax.config_arg import load_config
from cankd_jax.data import options, sources
from cankd_jax.train.trainer import check_loop_config
from cankd_jax.train.build import make_terms
from cankd_jax.train.tasks import make_task
from cankd_jax.train.optim import make_optimizer
from cankd_jax.train.runner import phase_config

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
REQUIRED = ("total_steps", "batch_size", "seed", "log_every", "eval_every", "checkpoint_every", "dtype", "remat")

CASES = [
    ("smoke.py", ""),
    ("demo.py", ""),
    ("demo.py", "loss=mgd+cwd+at+pkd+fitnet+nonlocal_self"),
    ("demo.py", "loss=in_mse+cankd_no_in+cankd_no_skip+cankd_gaussian+cankd_embedded_gaussian+cankd_concatenation"),
    ("cityscapes.py", ""),
    ("cityscapes.py", "head=pspnet"),
    ("cityscapes.py", "head=pspnet,loss=cwd"),
    ("cityscapes.py", "student=mobilenet_v2"),
    ("cityscapes.py", "teacher=pspnet"),
    ("cityscapes.py", "loss=mgd"),
    ("cityscapes.py", "loss=none"),
    ("ade20k.py", "head=pspnet"),
    ("classification.py", ""),
    ("classification.py", "data=cifar10"),
    ("classification.py", "data=cifar10,loss=at"),
    ("coco.py", ""),
    ("coco.py", "detector=fcos,teacher=fcos_r101"),
    ("coco.py", "teacher=fcos_x101"),
    ("coco.py", "teacher=gfl_r101,loss=pkd"),
    ("coco.py", "teacher=retinanet_x101,dagger=true,loss=mgd"),
    ("coco.py", "loss=none"),
    ("coco.py", "detector=faster_rcnn"),
    ("coco.py", "detector=faster_rcnn,teacher=cmrcnn_x101,dagger=true"),
    ("coco.py", "teacher=faster_rcnn_x101"),
    ("coco.py", "teacher=mask_rcnn_swin_s,dagger=true"),
    ("coco.py", "teacher=mask_rcnn_swin_s,pairing=stride,loss=pkd"),
    ("coco.py", "detector=reppoints,dagger=true"),
    ("coco.py", "detector=reppoints,loss=cankd_dcn"),
    ("coco_detr.py", ""),
    ("coco_detr.py", "teacher=dino_swin_l"),
    ("coco_detr.py", "loss=none"),
    ("detection_smoke.py", ""),
    ("detection_smoke.py", "detector=fcos"),
    ("detection_smoke.py", "detector=reppoints"),
    ("detection_demo.py", ""),
    ("detection_demo.py", "detector=fcos,loss=cankd+fitnet+cwd"),
    ("detection_demo.py", "teacher=swin"),
    ("detection_demo.py", "detector=reppoints"),
    ("detection_demo.py", "detector=dino"),
]


def load(file: str, arg: str = ""):
    return load_config(os.path.join(CONFIGS, file), arg)


def runs(config):
    if config.get("phases"):
        return [phase_config(config, p, "/w") for p in config.phases]
    return [config]


_TRACED: dict = {}


def _outputs(cfg_block, num_classes, size):
    """The network's output shapes, traced once per distinct network: most cases share a teacher or a student, and
    tracing a ResNet-101 is most of this file's time."""
    key = (json.dumps(cfg_block.to_dict(), sort_keys=True, default=repr), num_classes, size)
    if key not in _TRACED:
        net = models.make_network(cfg_block, num_classes=num_classes)
        x = jnp.zeros((1, *size, 3), jnp.float32)
        _TRACED[key] = jax.eval_shape(lambda: net.init_with_output(jax.random.key(0), x, train=False)[0])
    return _TRACED[key]


@pytest.mark.parametrize("file,arg", CASES, ids=[f"{f}:{a}" if a else f for f, a in CASES])
def test_config_builds_and_its_terms_line_up(file, arg):
    for cfg in runs(load(file, arg)):
        for key in REQUIRED:
            assert key in cfg, key
        check_loop_config(cfg)
        make_task(cfg.task)
        make_optimizer(cfg.optimizer, cfg.total_steps)
        terms = make_terms(cfg.get("distill", ()))
        if not terms:
            continue
        # every network here reads any size that is a multiple of 32; DINO's 900 queries need 900 positions
        size = (256, 256) if cfg.task.get("detector") == "dino" else (64, 64)
        s_out = _outputs(cfg.student, cfg.task.num_classes, size)
        t_out = _outputs(cfg.teacher, cfg.task.num_classes, size)
        for term in terms:
            assert term.student_feature in s_out and term.teacher_feature in t_out, term.name
            s_ch = s_out[term.student_feature].shape[-1]
            t_ch = t_out[term.teacher_feature].shape[-1]
            if term.connector is not None:
                assert term.connector.out_channels == t_ch, (term.name, term.connector.out_channels, t_ch)
                s_ch = term.connector.out_channels
            if hasattr(term.loss, "in_channels"):
                assert term.loss.in_channels == t_ch == s_ch, term.name
            if hasattr(term.loss, "teacher_channels"):
                assert term.loss.teacher_channels == t_ch, term.name
            if term.loss.__class__.__name__ in ("L2Loss", "PKDLoss", "CWDLoss"):
                assert s_ch == t_ch, term.name


def test_every_data_key_is_in_each_config_so_the_command_line_can_set_it():
    """ml_collections refuses `--config.data.KEY=VALUE` for a key the section lacks, and for one whose value is
    None: before `data_section`, no config could take `data.train_split`, and Cityscapes' could not take
    `data.flip_prob` or `data.eval_pad_size`."""
    for file, arg in CASES + [("foreign_teacher.py", "")]:
        for cfg in runs(load(file, arg)):
            key = options.dataset_key(cfg.data.name)
            assert set(cfg.data) == set(options.allowed_keys(key)), (file, arg)
            unset = [k for k, v in cfg.data.items() if v is None]
            assert not unset, (file, arg, unset)


def test_the_option_tables_name_the_data_sets_and_tasks_the_sources_serve():
    assert {k: spec.task for k, spec in sources.DATASETS.items()} == options.TASKS
    assert set(options.DATASET_DEFAULTS) == set(options.TASKS)
    with pytest.raises(ValueError, match=r"unknown data config key\(s\) \['ratio_range'\] for dataset 'coco'"):
        options.data_section("coco", ratio_range=(0.5, 2.0))


def test_unknown_config_arguments_are_named():
    with pytest.raises(ValueError, match="unknown head unet; choose from deeplabv3, pspnet"):
        load("cityscapes.py", "head=unet")
    with pytest.raises(ValueError, match="takes head=..., teacher=..., student=..., loss=..."):
        load("cityscapes.py", "heads=pspnet")
    with pytest.raises(ValueError, match="unknown loss kd"):
        load("demo.py", "loss=cankd+kd")
    with pytest.raises(ValueError, match="loss names cankd more than once, in 'loss=cankd\\+mgd\\+cankd'"):
        load("demo.py", "loss=cankd+mgd+cankd")  # two phases would have shared one workdir
    # A config without choices refuses an argument rather than ignore it (`smoke.py:detector=dino` meant the
    # detection smoke config).
    for name in ("smoke.py", "foreign_teacher.py"):
        with pytest.raises(ValueError, match=f"configs/{name} takes no argument after ':', got 'detector=dino'"):
            load(name, "detector=dino")
        load(name, "")


@pytest.mark.parametrize("arg", ["loss=mgd+cwd", ""])
def test_demo_phases_are_teacher_student_then_each_loss(arg):
    cfg = load("demo.py", arg)
    losses = ["mgd", "cwd"] if arg else ["cankd"]
    assert list(cfg.phases) == ["teacher", "student", *losses]
    for loss in losses:
        (term,) = cfg.phase_overrides[loss]["distill"]
        assert term["loss"] == loss


def test_coco_config_follows_the_paper():
    cfg = load("coco.py")
    assert (cfg.task.detector, cfg.student.name, cfg.student.backbone, cfg.data.norm) == (
        "retinanet", "retinanet", "resnet50", "pytorch")
    assert (cfg.teacher.name, cfg.teacher.backbone, cfg.teacher.checkpoint, cfg.teacher.random_init) == (
        "retinanet_fpn", "resnet101", "", False)
    terms = make_terms(cfg.distill)
    assert [(t.student_feature, t.loss.in_channels, t.loss.loss_weight) for t in terms] == [
        (f"fpn.p{k}", 256, 10.0) for k in (3, 4, 5, 6)]
    assert len({t.name for t in terms}) == 4 and all(t.connector is None for t in terms)
    epoch = 117_266 // 4
    o = cfg.optimizer
    assert (o.lr, o.momentum, o.weight_decay, o.grad_clip_norm, o.warmup_steps, o.warmup_factor) == (
        0.005, 0.9, 1e-4, 35.0, 500, 0.001)
    assert cfg.total_steps == 24 * epoch and list(o.boundaries) == [16 * epoch, 22 * epoch] and cfg.batch_size == 4
    # The authors' 1x pairs (FCOS X101 / GFL R101 -> RetinaNet R50); every other pair is 2x.
    for teacher, trunk in (("fcos_x101", ("fcos_fpn", "resnext101_64x4d")), ("gfl_r101", ("gfl_fpn", "resnet101"))):
        one_x = load("coco.py", f"teacher={teacher}")
        assert one_x.total_steps == 12 * epoch and list(one_x.optimizer.boundaries) == [8 * epoch, 11 * epoch]
        assert (one_x.teacher.name, one_x.teacher.backbone) == trunk
    assert load("coco.py", "teacher=retinanet_x101").total_steps == 24 * epoch
    f = load("coco.py", "detector=fcos")
    assert f.total_steps == 24 * epoch
    # The authors' FCOS student: norm_on_bbox, centerness on the classification branch, tower-conv biases.
    assert (f.teacher.backbone, f.student.backbone, f.data.norm, dict(f.student.head_kwargs)) == (
        "resnet101_caffe", "resnet50_caffe", "caffe",
        {"norm_on_bbox": True, "centerness_on_reg": False, "conv_bias": True})
    assert load("coco.py", "dagger=true").student.inherit == "teacher" and not cfg.student.inherit
    with pytest.raises(ValueError, match="teacher must be a retinanet"):
        load("coco.py", "teacher=fcos_r101,dagger=true")


def test_coco_reppoints_row_follows_the_authors_config():
    """nlkdIN_reppoints_x101_reppoints_r50_2x_coco.py and its dagger twin: RepPoints X101-32x4d-DCN (c3-c5) ->
    RepPoints R50, CanKD (in_channels 256, loss_weight 10) on the necks' outputs 0-3 (P3-P6), SGD 0.005, clip 35, 2x;
    the DCN ablation's loss (DCN_NLKD_Loss) on the same levels."""
    epoch = 117_266 // 4
    c = load("coco.py", "detector=reppoints")
    assert (c.task.detector, c.student.name, c.student.backbone, c.data.norm) == (
        "reppoints", "reppoints", "resnet50", "pytorch")
    assert (c.teacher.name, c.teacher.backbone) == ("reppoints_fpn", "resnext101_32x4d_dcn")
    assert [(t.student_feature, t.teacher_feature, t.loss.in_channels, t.loss.loss_weight, t.loss.projection)
            for t in make_terms(c.distill)] == [(f"fpn.p{k}", f"fpn.p{k}", 256, 10.0, "conv") for k in (3, 4, 5, 6)]
    o = c.optimizer
    assert (o.lr, o.grad_clip_norm, c.total_steps) == (0.005, 35.0, 24 * epoch)
    d = load("coco.py", "detector=reppoints,dagger=true")
    assert [tuple(p) for p in d.student.inherit_prefixes] == [("neck.", "neck."), ("bbox_head.", "bbox_head.")]
    assert {t.loss.projection for t in make_terms(load("coco.py", "detector=reppoints,loss=cankd_dcn").distill)} == {
        "deform"}


def test_coco_two_stage_rows_follow_the_authors_configs():
    """nlkdIN_fpn_faster-rcnn_r101_faster-rcnn_r50_2x_coco.py, nlkdIN_fpn_cmrcnn_x101_frcnn_r50_2x_coco.py, their
    dagger twins and nlkdIN_fpn_faster-rcnn_x101_retina_r50_1x_coco.py."""
    epoch = 117_266 // 4
    f = load("coco.py", "detector=faster_rcnn")
    assert (f.task.detector, f.student.name, f.student.backbone, f.data.norm) == (
        "faster_rcnn", "faster_rcnn", "resnet50", "pytorch")
    assert (f.teacher.name, f.teacher.backbone) == ("faster_rcnn_fpn", "resnet101")
    terms = make_terms(f.distill)
    assert [(t.student_feature, t.teacher_feature, t.loss.in_channels, t.loss.loss_weight) for t in terms] == [
        (f"fpn.p{k}", f"fpn.p{k}", 256, 10.0) for k in (2, 3, 4, 5)]  # the neck's outputs 0-3
    o = f.optimizer
    assert (o.lr, o.momentum, o.weight_decay, o.grad_clip_norm) == (0.005, 0.9, 1e-4, 35.0)
    assert f.total_steps == 24 * epoch and list(o.boundaries) == [16 * epoch, 22 * epoch]
    assert not f.student.inherit
    d = load("coco.py", "detector=faster_rcnn,dagger=true")  # neck + roi_head.bbox_head, not the RPN head
    assert d.student.inherit == "teacher" and not d.student.inherit_skip_mismatched
    assert [tuple(p) for p in d.student.inherit_prefixes] == [
        ("neck.", "neck."), ("roi_head.bbox_head.", "roi_head.bbox_head.")]
    c = load("coco.py", "detector=faster_rcnn,teacher=cmrcnn_x101,dagger=true")  # Cascade's first stage
    assert (c.teacher.name, c.teacher.backbone, c.total_steps) == ("cascade_rcnn_fpn", "resnext101_64x4d", 24 * epoch)
    assert [tuple(p) for p in c.student.inherit_prefixes] == [
        ("neck.", "neck."), ("roi_head.bbox_head.", "roi_head.bbox_head.0.")] and c.student.inherit_skip_mismatched
    # Faster R-CNN X101-32x4d -> RetinaNet R50, 1x: levels paired by stride (the teacher's P3-P6, not its P2-P5)
    r = load("coco.py", "teacher=faster_rcnn_x101")
    assert (r.teacher.name, r.teacher.backbone, r.total_steps) == ("faster_rcnn_fpn", "resnext101_32x4d", 12 * epoch)
    assert [(t.student_feature, t.teacher_feature) for t in make_terms(r.distill)] == [
        (f"fpn.p{k}", f"fpn.p{k}") for k in (3, 4, 5, 6)]
    with pytest.raises(ValueError, match="teacher=retinanet_r101 gives only fpn.p3.*choose a teacher with those "
                                         "levels \\(faster_rcnn_r101, faster_rcnn_x101, cmrcnn_x101, "
                                         "mask_rcnn_swin_s\\)"):
        load("coco.py", "detector=faster_rcnn,teacher=retinanet_r101")
    with pytest.raises(ValueError, match="teacher must be a retinanet or mask_rcnn \\(teacher=faster_rcnn_x101 is a faster_rcnn"):
        load("coco.py", "teacher=faster_rcnn_x101,dagger=true")


def test_coco_swin_row_follows_the_authors_config():
    """nlkdIN_dagger_fpn_mask-rcnn_swin_retina_r50_2x_coco.py: Mask R-CNN Swin-S's P2-P5 against RetinaNet R50's
    P3-P6 by index through NLKD_IN_align_Loss (weight 10), the student's neck from the teacher's by shape."""
    epoch = 117_266 // 4
    c = load("coco.py", "teacher=mask_rcnn_swin_s,dagger=true")
    assert (c.teacher.name, c.teacher.backbone, c.student.name, c.data.norm, c.total_steps) == (
        "mask_rcnn_fpn", "swin_small", "retinanet", "pytorch", 24 * epoch)
    terms = make_terms(c.distill)
    assert [(t.student_feature, t.teacher_feature, type(t.loss).__name__, t.loss.in_channels, t.loss.loss_weight)
            for t in terms] == [(f"fpn.p{k + 1}", f"fpn.p{k}", "CanKDAlignLoss", 256, 10.0) for k in (2, 3, 4, 5)]
    assert c.student.inherit == "teacher" and c.student.inherit_skip_mismatched
    assert [tuple(p) for p in c.student.inherit_prefixes] == [("neck.", "neck.")]
    o = c.optimizer
    assert (o.lr, o.momentum, o.weight_decay, o.grad_clip_norm) == (0.005, 0.9, 1e-4, 35.0)
    by_stride = make_terms(load("coco.py", "teacher=mask_rcnn_swin_s,pairing=stride").distill)
    assert [(t.student_feature, t.teacher_feature, type(t.loss).__name__) for t in by_stride] == [
        (f"fpn.p{k}", f"fpn.p{k}", "CanKDLoss") for k in (3, 4, 5, 6)]
    with pytest.raises(ValueError, match="pairing=index distils fpn.p3 from the teacher's fpn.p2.*loss=fitnet"):
        load("coco.py", "teacher=mask_rcnn_swin_s,loss=fitnet")


@pytest.mark.parametrize("arg,teacher_head,student_keys,weight", [
    ("student=mobilenet_v2", "deeplabv3", ["backbone.layer7.0.conv.0.conv.weight", "decode_head.aspp_modules.1.conv.weight",
                                           "auxiliary_head.convs.0.conv.weight"], 10.0),
    ("teacher=pspnet", "pspnet", ["backbone.layer4.1.conv2.weight", "decode_head.aspp_modules.1.conv.weight"], 20.0),
])
def test_the_rest_of_the_paper_segmentation_table(arg, teacher_head, student_keys, weight):
    """DeepLabV3 R101 -> DeepLabV3 MobileNetV2 and the cross-head PSPNet R101 -> DeepLabV3 R18 (the authors' CanKD
    weight 20): networks with mmseg's key names, which import what they export."""
    from cankd_jax.interop.torch import export_state_dict, import_state_dict

    cfg = load("cityscapes.py", arg)
    assert cfg.teacher.name == teacher_head and cfg.student.name == "deeplabv3"
    (term,) = make_terms(cfg.distill)
    assert term.loss.loss_weight == weight
    x = jnp.zeros((1, 64, 64, 3), jnp.float32)
    rng = np.random.default_rng(0)
    # The teacher at 1/4 width (its key names do not depend on it): the full R101 round trip moved 0.5 GB per case
    teacher = dict(cfg.teacher.to_dict(), backbone_kwargs=dict(base_width=16, stem_width=16), head_channels=32)
    for block, keys in ((cfg.student, student_keys), (teacher, ["backbone.layer3.22.conv3.weight"])):
        net = models.make_network(block, num_classes=19)
        # Distinct random values in every tensor (drawn on the host: no compile), so a key mapped to the wrong
        # tensor could not come back equal.
        abstract = jax.eval_shape(lambda: net.init(jax.random.key(0), x, train=False))  # noqa: B023
        variables = jax.tree.map(lambda a: rng.random(a.shape, dtype=np.float32).astype(a.dtype), abstract)
        sd = export_state_dict(net, variables)
        assert set(keys) <= set(sd), sorted(set(keys) - set(sd))
        again, _ = import_state_dict(net, sd)
        chex.assert_trees_all_equal(again, variables)


def test_ablation_presets_are_cankds_preset_with_one_option_changed():
    from cankd_jax.losses.presets import ABLATIONS, distill_term

    base = distill_term("cankd", student_channels=64, teacher_channels=128)
    for name, change in ABLATIONS.items():
        term = distill_term(name, student_channels=64, teacher_channels=128)
        assert term["name"] == name and term["loss"] == "cankd"
        assert term["connector"] == base["connector"] == 128
        assert len(change) == 1 and term["options"] == {**base["options"], **change}, name
    in_mse = distill_term("in_mse", student_channels=64, teacher_channels=128)
    assert in_mse["connector"] == 128 and in_mse["options"] == {"loss_weight": base["options"]["loss_weight"]}


def test_swin_demo_phases_build_their_own_networks():
    """A phase that names another network replaces the base block instead of merging into it (the Faster R-CNN
    Swin teacher phase of a RetinaNet R18 comparison keeps none of the ResNet's options)."""
    c = load("detection_demo.py", "teacher=swin")
    teacher, cankd = (phase_config(c, p, "/w") for p in ("teacher", "cankd"))
    assert (teacher.task.detector, teacher.student.name, teacher.student.backbone) == ("faster_rcnn", "faster_rcnn",
                                                                                         "swin_tiny")
    assert "base_width" not in teacher.student.backbone_kwargs and teacher.task.roi_samples == 128
    assert (cankd.student.name, cankd.student.backbone_kwargs.base_width) == ("retinanet", 8)
    assert [(t["student_feature"], t["teacher_feature"], t["loss"]) for t in cankd.distill] == [
        (f"fpn.p{k + 1}", f"fpn.p{k}", "cankd_align") for k in (2, 3, 4, 5)]
