"""Config values out of range are one-line errors naming the key, before any step: values that used to train
silently wrong (a negative clip norm or learning rate: gradient ascent; a zero `data.scale`: 1x1 images) or to
fail deep inside JAX, Orbax or os (a negative connector width, a workdir that is a file, an export of another
width)."""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from cankd_jax.config_arg import load_config
from cankd_jax.data.dataset import make_data
from cankd_jax.models.conv import ConvModule
from cankd_jax.models.dense_heads import RetinaHead
from cankd_jax.models.registry import make_segmenter
from cankd_jax.train import build, trainer
from cankd_jax.train.optim import make_optimizer
from cankd_jax.train.sharding import make_mesh
from cankd_jax.train.tasks import make_task
from cankd_jax.train.weights import restore_export

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "smoke.py")


def _optimizer(**fields):
    return ml_collections.ConfigDict({"name": "sgd", "lr": 0.01, "momentum": 0.9, **fields})


@pytest.mark.parametrize("fields, message", [
    (dict(grad_clip_norm=-1.0), "optimizer.grad_clip_norm must be a finite number >= 0"),
    (dict(lr=-0.01), "optimizer.lr must be a finite number >= 0, got -0.01"),
    (dict(lr=math.inf), "optimizer.lr must be a finite number >= 0, got inf"),
    (dict(lr="fast"), "optimizer.lr must be a finite number >= 0, got 'fast'"),
    (dict(momentum=1.5), r"optimizer.momentum must be a finite number in \[0, 1\)"),
    (dict(weight_decay=-1e-4), "optimizer.weight_decay must be"),
    (dict(name="adamw", b2=1.0), r"optimizer.b2 must be a finite number in \[0, 1\)"),
    (dict(warmup_factor=2.0), r"optimizer.warmup_factor must be a finite number in \[0, 1\]"),
])
def test_an_optimizer_value_out_of_range_is_named(fields, message):
    with pytest.raises(ValueError, match=message):
        make_optimizer(_optimizer(**fields), 10)


def test_a_negative_clip_norm_would_have_turned_the_gradient_around():
    """Why the clip norm is checked: optax takes -1 and flips every gradient (the run then climbs its loss)."""
    tx = optax.clip_by_global_norm(-1.0)
    g = {"w": jnp.array([3.0, 4.0])}
    flipped, _ = tx.update(g, tx.init(g))
    np.testing.assert_allclose(flipped["w"], [-0.6, -0.8], rtol=1e-6)


def test_a_floor_above_the_rate_is_refused_where_the_schedule_decays_to_it():
    """Before: lr=0.001 with min_lr=0.5 trained, the poly schedule raising the rate to 0.31 by step 3."""
    for schedule in ("poly", "cosine"):
        with pytest.raises(ValueError, match=rf"optimizer.min_lr=0.5 is above optimizer.lr=0.001: the {schedule} "):
            make_optimizer(_optimizer(lr=0.001, min_lr=0.5, schedule=schedule), 10)
    with pytest.raises(ValueError, match=r"optimizer.min_lr=0.0001 \(the default\) is above optimizer.lr=5e-05"):
        make_optimizer(_optimizer(lr=5e-5, schedule="poly"), 10)
    _, schedule = make_optimizer(_optimizer(lr=0.001, min_lr=0.5, schedule="step"), 10)  # no floor there
    assert float(schedule(9)) == pytest.approx(0.001)


@pytest.mark.parametrize("build, message", [
    (lambda: ConvModule(-1), "ConvModule: features must be a positive integer, got -1"),
    (lambda: ConvModule(8, 0), "ConvModule: kernel_size must be a positive integer, got 0"),
    (lambda: RetinaHead(num_classes=3, stacked_convs=-1), "RetinaHead: stacked_convs must be an integer >= 0"),
    (lambda: make_segmenter("fcn", num_classes=3, backbone="resnet18_v1c_d8", channels=0),
     r"head_channels must be a positive integer \(or unset for the head's default width\), got 0"),
])
def test_a_network_width_out_of_range_is_named(build, message):
    """Before: a negative width failed deep in XLA (broadcast_in_dim), a zero head width became the default one,
    and a negative tower built no convs at all."""
    with pytest.raises(ValueError, match=message):
        build()


@pytest.mark.parametrize("value", [-1, 2.5, "big"])
def test_an_fsdp_threshold_out_of_range_is_named(value):
    """Before: a negative threshold was taken (every array counted as large enough) without a word."""
    from cankd_jax.train.sharding import ParamLayout

    with pytest.raises(ValueError, match=rf"mesh.fsdp_min_size must be an integer >= 0 .*got {value!r}"):
        ParamLayout.from_config({"fsdp": True, "fsdp_min_size": value})
    assert ParamLayout.from_config({"fsdp": True, "fsdp_min_size": 0}).min_size == 0


def test_a_zero_rate_is_allowed_and_stays_zero_under_the_cosine_schedule():
    _, schedule = make_optimizer(_optimizer(lr=0.0, schedule="cosine", min_lr=0.0), 10)  # was a ZeroDivisionError
    assert [float(schedule(s)) for s in (0, 5, 10)] == [0.0, 0.0, 0.0]
    _, schedule = make_optimizer(_optimizer(lr=0.1, schedule="cosine", min_lr=0.01), 10)
    np.testing.assert_allclose(float(schedule(10)), 0.01, rtol=1e-6)


def _term(**fields):
    return [dict(name="kd", loss="cankd", student_feature="layer4", teacher_feature="layer4",
                 options=dict(in_channels=8), **fields)]


@pytest.mark.parametrize("fields, message", [
    (dict(weight=-1.0), "distill term 'kd': weight must be a finite number >= 0, got -1.0"),
    (dict(weight=math.nan), "distill term 'kd': weight must be a finite number >= 0, got nan"),
    (dict(connector=-4),
     "distill term 'kd': connector must be a whole number of output channels >= 0 \\(0: no connector\\), got -4"),
    (dict(connector=2.5), "connector must be a whole number of output channels >= 0"),
])
def test_a_distillation_term_value_out_of_range_is_named(fields, message):
    with pytest.raises(ValueError, match=message):
        build.make_terms(_term(**fields))


def test_a_negative_loss_weight_option_is_named():
    terms = _term()
    terms[0]["options"]["loss_weight"] = -10.0
    with pytest.raises(ValueError, match="distill term 'kd': options.loss_weight must be a finite number >= 0"):
        build.make_terms(terms)
    assert build.make_terms(_term(weight=0.0, connector=16))[0].connector.out_channels == 16


def test_a_negative_task_weight_is_named_even_inside_a_per_class_list():
    with pytest.raises(ValueError, match="task.aux_weight must be a finite number >= 0, got -1.0"):
        make_task(dict(name="segmentation", num_classes=3, aux_weight=-1.0))
    with pytest.raises(ValueError,
                       match=r"task.class_weight must be a finite number >= 0 \(all of \(1.0, -2.0, 1.0\)\)"):
        make_task(dict(name="segmentation", num_classes=3, class_weight=(1.0, -2.0, 1.0)))
    assert make_task(dict(name="segmentation", num_classes=3, class_weight=(0.5, 1.0, 1.0), aux_weight=0.0))


@pytest.mark.parametrize("fields, message", [
    (dict(scale=(0, 32)), r"data.scale must be two positive whole numbers of pixels, got \(0, 32\)"),
    (dict(crop_size=(16,)), r"data.crop_size must be two positive whole numbers of pixels, got \(16,\)"),
    (dict(eval_batch_size=0), "data.eval_batch_size must be a positive number of images, got 0"),
    (dict(workers=-1), r"data.workers must be >= 0 \(0: in-process\), got -1"),
])
def test_a_data_size_out_of_range_is_named(tmp_path, fields, message):
    with pytest.raises(ValueError, match=message):
        make_data(dict(name="synthetic", data_dir=str(tmp_path), image_size=32, num_train=8, num_test=4, **fields))
    assert not os.listdir(tmp_path)  # refused before the data set was made


def test_a_data_dir_or_workdir_that_is_a_file_is_named(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    with pytest.raises(ValueError, match=f"data.data_dir '{afile}' is a file, not a directory"):
        make_data(dict(name="synthetic", data_dir=str(afile), image_size=32, num_train=8, num_test=4))
    config = load_config(SMOKE)
    with pytest.raises(ValueError, match=f"--workdir '{afile}' is a file, not a directory"):
        trainer._train_and_evaluate(config, str(afile), None)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("")
    with pytest.raises(ValueError, match="the workdir's checkpoints .*run/checkpoints' is a file"):
        trainer._train_and_evaluate(config, str(tmp_path / "run"), None)


def test_a_negative_seed_is_named():
    config = load_config(SMOKE)
    config.seed = -1
    with pytest.raises(ValueError, match=r"--config.seed=-1: must be an integer >= 0"):
        trainer.check_loop_config(config)


def test_an_output_name_neither_network_has_is_named_with_the_outputs_it_has():
    config = load_config(SMOKE)
    config.distill[0].student_feature = "bogus"
    run = build.build_run(config, make_mesh(jax.devices()[:1]), input_size=(32, 32))
    with pytest.raises(ValueError, match=r"distill student_feature 'bogus' is not among the student's outputs "
                                         r"\(.*layer4.*logits.*\); name one of them, or a module by its path"):
        jax.eval_shape(run.init_variables, jax.random.key(0))


def _save(directory, kernel_shape):
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(str(directory), {"params": {"conv": {"kernel": np.zeros(kernel_shape, np.float32)},
                                           "bn": {"scale": np.ones(kernel_shape[-1:], np.float32)}}})
    ckptr.wait_until_finished()


def test_an_export_is_checked_before_it_is_restored(tmp_path):
    abstract = {"params": {"conv": {"kernel": jax.ShapeDtypeStruct((3, 3, 4, 16), jnp.float32)},
                           "bn": {"scale": jax.ShapeDtypeStruct((16,), jnp.float32)}}}
    (tmp_path / "workdir").mkdir()
    _save(tmp_path / "workdir" / "export", (3, 3, 4, 16))
    restored = restore_export(str(tmp_path / "workdir" / "export"), abstract)
    assert restored["params"]["conv"]["kernel"].shape == (3, 3, 4, 16)
    # the run's workdir instead of its export/: the directory meant is named
    with pytest.raises(ValueError, match=r"teacher checkpoint '.*workdir' is not an export/ directory \(no Orbax "
                                         r"checkpoint in it\); did you mean '.*workdir/export'\?"):
        restore_export(str(tmp_path / "workdir"), abstract)
    # an export of half the width: the arrays that differ, with both shapes
    _save(tmp_path / "narrow", (3, 3, 4, 8))
    with pytest.raises(ValueError, match=r"saved from a network of other shapes: 2 arrays differ, e.g. "
                                         r"\['params'\]\['bn'\]\['scale'\] \(8,\) \(expected \(16,\)\); "
                                         r"\['params'\]\['conv'\]\['kernel'\] \(3, 3, 4, 8\) "
                                         r"\(expected \(3, 3, 4, 16\)\)"):
        restore_export(str(tmp_path / "narrow"), abstract)


# ---------------------------------------------------------------------------------------------- detection

DET_SMOKE = os.path.join(ROOT, "configs", "detection_smoke.py")


@pytest.mark.parametrize("fields, message", [
    (dict(nms_pre=0), "task.nms_pre must be a positive count of boxes; got 0"),  # failed after training, at eval
    (dict(max_per_img=0), "task.max_per_img must be a positive count of boxes; got 0"),
    (dict(score_thr=1.5), r"task.score_thr must be in \[0, 1\)"),  # no detection, mAP 0, silently
    (dict(iou_threshold=-0.5), r"task.iou_threshold must be in \[0, 1\], or None for the detector's own"),
])
def test_a_detection_post_processing_limit_out_of_range_is_named(fields, message):
    with pytest.raises(ValueError, match=message):
        make_task(dict(name="detection", num_classes=3, **fields))


@pytest.mark.parametrize("detector, head, neck, message", [
    ("retinanet", dict(num_anchors=3), {}, "the student's RetinaHead has num_anchors=3, but retinanet's anchor "
                                           "generator places 9 at each position; set the head's num_anchors to 9"),
    ("faster_rcnn", dict(num_anchors=1), {}, "RPNHead has num_anchors=1, but faster_rcnn's anchor generator places 3"),
    ("fcos", dict(strides=(8, 16, 32, 64)), dict(num_outs=4),
     r"an FCOS student needs 5 levels, one per regress range .*; this one has 4 \(strides \(8, 16, 32, 64\)\)"),
])
def test_a_head_the_targets_do_not_fit_is_named_when_the_run_is_built(detector, head, neck, message):
    """Were chex shape assertions (or an unnamed count mismatch) inside the first step's loss."""
    config = load_config(DET_SMOKE, f"detector={detector}")
    config.student.head_kwargs.update(head)
    config.student.neck_kwargs.update(neck)
    with pytest.raises(ValueError, match=message):
        build.build_run(config, make_mesh(jax.devices()[:1]), input_size=(64, 64), abstract_teacher=True)


@pytest.mark.parametrize("field", ["num_queries", "num_points", "decoder_layers"])
def test_a_dino_count_of_zero_is_named(field):
    from cankd_jax import models  # noqa: PLC0415

    config = load_config(DET_SMOKE, "detector=dino")
    config.student.head_kwargs[field] = 0
    net = models.make_network(config.student, num_classes=3)
    with pytest.raises(ValueError, match=f"DINO: {field} must be at least 1, got 0"):
        jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False))


def test_a_prior_probability_outside_0_1_is_named():
    from cankd_jax.models.dense_heads import prior_bias  # noqa: PLC0415

    np.testing.assert_allclose(prior_bias(0.01), -math.log(99.0))
    for p in (0.0, 1.0):
        with pytest.raises(ValueError, match=rf"prior_prob must be in \(0, 1\) .*, got {p}"):
            prior_bias(p)


@pytest.mark.parametrize("fields, message", [
    (dict(flip_prob=1.5), r"data.flip_prob must be a probability in \[0, 1\], got 1.5"),
    (dict(min_size=-5), r"data.min_size must be >= 0 \(pixels; 0: keep every image\), got -5"),
    (dict(filter_empty="no"), "data.filter_empty must be True or False, got 'no'"),
    (dict(crop_size=(32, 32)), "does not crop to data.crop_size"),
])
def test_a_detection_data_option_out_of_range_is_named(tmp_path, fields, message):
    with pytest.raises(ValueError, match=message):
        make_data(dict(name="synthetic_detection", data_dir=str(tmp_path), image_size=64, num_train=8, num_test=4,
                       **fields))


def test_a_zero_batch_says_positive():
    with pytest.raises(ValueError, match=r"batch_size=0 must be positive: a multiple of the 1 devices "
                                         r"\(--config.batch_size=1\)"):
        from cankd_jax.train.sharding import check_global_batch  # noqa: PLC0415

        check_global_batch(0, make_mesh(jax.devices()[:1]))


def test_checkpoint_prefixes_must_be_pairs():
    from cankd_jax.interop.torch import prefix_pairs  # noqa: PLC0415

    assert prefix_pairs([("", "module.")], "checkpoint_prefixes") == {"": "module."}
    assert prefix_pairs({"backbone.": ""}, "pretrained_prefixes") == {"backbone.": ""}
    assert prefix_pairs(None, "checkpoint_prefixes") is None
    for bad in ("module.", [("a", "b", "c")], [("", 1)]):
        with pytest.raises(ValueError, match=r"checkpoint_prefixes must be a list of \(model prefix, checkpoint "
                                             r"prefix\) pairs, e.g. \[\('', 'module.'\)\]; got"):
            prefix_pairs(bad, "checkpoint_prefixes")


def test_a_workdir_another_run_is_using_is_refused_and_the_lock_ends_with_the_run(tmp_path):
    """Two train.py on one workdir interleaved their checkpoints and metrics (a step logged twice), exit 0."""
    import fcntl  # noqa: PLC0415

    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    other = os.open(os.path.join(workdir, ".lock"), os.O_CREAT | os.O_RDWR)  # as another process would hold it
    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with pytest.raises(ValueError, match=f"another train.py is using --workdir {workdir} \\(it holds "):
        trainer.train_and_evaluate(load_config(SMOKE), workdir)
    os.close(other)
    with trainer._workdir_lock(workdir):
        with pytest.raises(ValueError, match="another train.py is using"):
            with trainer._workdir_lock(workdir):
                pass
    with trainer._workdir_lock(workdir):  # released when the run ended
        pass


@pytest.mark.parametrize("address", ["127.0.0.1", "127.0.0.1:99999", ":1234", "host:port"])
def test_a_coordinator_address_without_a_valid_port_is_named_before_joining(address):
    """'127.0.0.1' was an IndexError from inside JAX; port 99999 started a service that waited forever."""
    from cankd_jax.train import distributed  # noqa: PLC0415

    with pytest.raises(distributed.DistributedSetupError,
                       match=f"--coordinator_address='{address}' must be HOST:PORT with a port in 1..65535"):
        distributed.initialize(address, 2, 0)


def test_a_coordinator_port_in_use_is_named_by_process_0(monkeypatch):
    """Process 0 serves the job at that port; JAX crashed (rc 139, no message) when another listener held it."""
    import socket  # noqa: PLC0415

    from cankd_jax.train import distributed  # noqa: PLC0415

    def joined(*args):  # a missed check must fail here, not wait for a second process or crash the test run
        raise AssertionError("jax.distributed.initialize was reached")

    monkeypatch.setattr(jax.distributed, "initialize", joined)
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        with pytest.raises(distributed.DistributedSetupError,
                           match=f"port {port} of --coordinator_address=127.0.0.1:{port} is already in use"):
            distributed.initialize(f"127.0.0.1:{port}", 2, 0)


@pytest.mark.parametrize("detector, norm, warned", [("fcos", "caffe", False), ("fcos", "pytorch", True),
                                                    ("retinanet", "pytorch", False), ("retinanet", "caffe", True)])
def test_a_pretrained_student_fed_another_input_normalisation_is_warned(detector, norm, warned):
    """coco.py's FCOS student (a caffe-style R50 from detectron's weights) with `data.norm=pytorch`, or a RetinaNet
    (torchvision's R50) with 'caffe', trained without a word before."""
    config = load_config(os.path.join(os.path.dirname(SMOKE), "coco.py"), f"detector={detector}")
    config.data.norm = norm
    assert build.check_input_norm(config) is None  # no pretrained weights: nothing to hold the input to
    config.student.pretrained = "r50.pth"
    message = build.check_input_norm(config)
    assert (message is not None) == warned
    if warned:
        wants = "caffe" if detector == "fcos" else "pytorch"
        assert f"data.norm='{norm}'" in message and f"made for '{wants}' input" in message
        assert f"--config.data.norm={wants}" in message


@pytest.mark.slow  # a training loop (14 s): the slow tier keeps the quick one near 5 minutes
def test_an_evaluation_that_fails_keeps_the_checkpoint_of_its_step(tmp_path, monkeypatch):
    """The last step's checkpoint was written only after its evaluation: an eval split that could not be batched
    (images of several sizes) lost the whole run, and the failure left an unfinished Orbax save behind."""
    def failing(task, data, mesh):
        def evaluate(model, variables):
            raise ValueError("eval examples of different shapes in one batch")
        return evaluate

    working = trainer.make_evaluator
    monkeypatch.setattr(trainer, "make_evaluator", failing)
    config = load_config(SMOKE)
    with config.unlocked():
        config.total_steps, config.eval_every, config.checkpoint_every = 1, 1, 1
        config.distill = []  # the student alone: the loop is what is under test, and it compiles in a third the time
    workdir = str(tmp_path / "run")
    with pytest.raises(ValueError, match="eval examples of different shapes"):
        trainer.train_and_evaluate(config, workdir)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1"]  # finished, not a tmp folder

    # Re-run once the evaluation works: the step whose evaluation failed is evaluated and logged (a finished run
    # re-opened with its eval row writes none: test_train_e2e.py's reference run)
    monkeypatch.setattr(trainer, "make_evaluator", working)
    summary = trainer.train_and_evaluate(config, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    assert [r["step"] for r in evals] == [1] and summary["eval"]["mIoU"] == evals[0]["eval/mIoU"]


def test_an_lr_mult_key_that_matches_no_parameter_is_refused():
    from cankd_jax.train.optim import scale_by_name  # noqa: PLC0415

    params = {"student": {"backbone": {"conv1": {"kernel": jnp.ones(2)}}, "head": {"bias": jnp.ones(1)}},
              "distill": {"backbone_proj": {"kernel": jnp.ones(1)}}}
    scale_by_name({"backbone": 0.1, "head.bias": 2.0}).init(params)
    with pytest.raises(ValueError, match=r"optimizer\.lr_mult key\(s\) \['backbon\.'\] match no student "
                                         r"parameter \(names look like 'backbone\.conv1\.kernel'\)"):
        scale_by_name({"backbone": 0.1, "backbon.": 0.5}).init(params)
    # A key that names only frozen parameters is valid, as in mmengine (multi_transform hands them in masked)
    frozen = jax.tree.map(lambda _: "trainable", params)
    frozen["student"]["backbone"] = jax.tree.map(lambda _: "frozen", params["student"]["backbone"])
    tx = optax.multi_transform({"trainable": scale_by_name({"backbone": 0.1}), "frozen": optax.set_to_zero()}, frozen)
    tx.init(params)
