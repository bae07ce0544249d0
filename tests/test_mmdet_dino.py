"""DINO's forward pass against mmdetection 3.3 itself: mmdet's own `dino/dino-4scale_r50_8xb2-12e_coco.py`,
shrunk for the CPU (ResNet-50 at base width 16, 2 encoder and 2 decoder layers with 64 feed-forward channels,
30 queries, 5 classes, 16 denoising queries; the transformer keeps mmdet's 256 channels, which its decoder's
query-position encoding assumes), every weight given seeded non-trivial values, imported strictly into ours.

Two images of unequal size in one padded batch, so the padding masks, valid ratios and masked proposals are
exercised. Compared: the eval-mode outputs of every decoder layer (`bbox_head.forward` of
`forward_transformer`), and the train-mode ones with mmdet's own contrastive denoising draw fed to ours,
including the encoder's selected proposals; the second image has fewer objects than the first, so some
denoising slots are unused. Tolerance 1e-5 relative to each output's largest value (float32 rounding through
a ResNet, four transformer layers with softmaxes and LayerNorms, sigmoid / inverse-sigmoid round trips; the
largest difference seen is 8e-7).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import openmmlab_reference as mr
from cankd_jax.interop import torch as interop
from cankd_jax import models
from cankd_jax.models import make_model
from cankd_jax.models.dino import Denoising
from conftest import assert_close

pytestmark = pytest.mark.skipif(mr.available() is not None, reason=str(mr.available()))

K, Q, BASE = 5, 30, 16
TRANSFORMER = {"model.num_queries": Q, "model.bbox_head.num_classes": K, "model.dn_cfg.group_cfg.num_dn_queries": 8,
               "model.encoder.layer_cfg.ffn_cfg.feedforward_channels": 64,
               "model.decoder.layer_cfg.ffn_cfg.feedforward_channels": 64}
HEAD = dict(num_queries=Q, feedforward_channels=64)
SWIN = dict(embed_dims=24, depths=(2, 2, 2, 2), num_heads=(1, 2, 3, 6))
# variant -> (mmdet config, its overrides, our registry name, our kwargs, our teacher trunk)
VARIANTS = {
    "4scale_r50": ("dino/dino-4scale_r50_8xb2-12e_coco.py",
                   {"model.backbone.base_channels": BASE, "model.neck.in_channels": [8 * BASE, 16 * BASE, 32 * BASE],
                    "model.encoder.num_layers": 2, "model.decoder.num_layers": 2, **TRANSFORMER},
                   "dino", dict(backbone_kwargs=dict(base_width=BASE, stem_width=BASE),
                                head_kwargs=dict(encoder_layers=2, decoder_layers=2, **HEAD)), "channel_mapper"),
    # Swin-L's layout shrunk (window 12 kept, so the stage maps are padded to the window); drop path off on both
    # sides (mmdet's 0.2 draws in train mode; the comparison is of the deterministic computation)
    "5scale_swin": ("dino/dino-5scale_swin-l_8xb2-12e_coco.py",
                    {**{f"model.backbone.{k}": list(v) if isinstance(v, tuple) else v for k, v in SWIN.items()},
                     "model.backbone.drop_path_rate": 0.0, "model.neck.in_channels": [24, 48, 96, 192],
                     "model.encoder.num_layers": 1, "model.decoder.num_layers": 1, **TRANSFORMER},
                    "dino_5scale", dict(backbone_kwargs=dict(SWIN, drop_path_rate=0.0),
                                        head_kwargs=dict(encoder_layers=1, decoder_layers=1, **HEAD)),
                    "channel_mapper_5scale"),
}
BATCH_HW = (96, 128)
IMG_SHAPES = ((96, 128), (80, 100))
GT = (np.array([[10, 12, 60, 70], [40, 30, 120, 90], [5, 50, 30, 95]], np.float32),
      np.array([[20, 10, 70, 60], [0, 0, 99, 79]], np.float32))
GT_LABELS = (np.array([1, 4, 0]), np.array([2, 2]))


def _perturb(tm: torch.nn.Module) -> None:
    """Seeded values for everything mmdet's init leaves trivial or unset: noise on every linear and embedding,
    offsets' and attention weights' kernels away from 0, the level embedding (an uninitialised tensor until
    init_weights), GroupNorm / BatchNorm statistics (`perturb_`). `memory_trans_norm`'s bias is 0, so a
    masked position's class logits are the classifier's bias alone, below the valid positions' maxima: the
    encoder's top-k then has no ties to break."""
    mr.perturb_(tm, seed=1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in tm.named_parameters():
            if name.startswith("backbone") or name.startswith("neck"):
                continue
            if p.dim() >= 2:
                p.add_(0.02 * torch.randn(p.shape, generator=g))
            else:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        tm.level_embed.copy_(torch.randn(tm.level_embed.shape, generator=g))
        tm.memory_trans_norm.bias.zero_()


@functools.lru_cache(maxsize=None)
def case(variant: str = "4scale_r50") -> dict:
    from mmdet.structures import DetDataSample

    config, overrides, name, kwargs, _ = VARIANTS[variant]
    tm, _ = mr.build(config, overrides, seed=0)
    _perturb(tm)
    model = make_model(name, num_classes=K, **kwargs)
    variables, report = interop.import_state_dict(model, tm.state_dict())
    x = np.random.default_rng(3).normal(size=(2, *BATCH_HW, 3)).astype(np.float32)
    for i, (h, w) in enumerate(IMG_SHAPES):  # the padding is zeros, as mmdet's collate pads
        x[i, h:], x[i, :, w:] = 0, 0
    samples = []
    for (h, w), boxes, labels in zip(IMG_SHAPES, GT, GT_LABELS):
        s = DetDataSample(metainfo=mr.img_meta((h, w), (h, w), BATCH_HW, (1.0, 1.0)))
        s.gt_instances = mr.gt_instances(boxes, labels)
        samples.append(s)
    return dict(tm=tm, model=model, variables=variables, report=report, x=x, samples=samples,
                img_shapes=np.array(IMG_SHAPES, np.float32))


def _theirs(train: bool, cotangents: dict | None = None, variant: str = "4scale_r50"):
    """mmdet's outputs (and its dn draw); with `cotangents`, also the gradient of sum(output * cotangent) with
    respect to every trainable parameter, by state-dict key."""
    c = case(variant)
    tm = c["tm"]
    tm.train(train)
    tm.zero_grad()
    dn = {}
    if train:
        gen = tm.dn_query_generator
        torch.manual_seed(4)
        dn_label, dn_bbox, dn_mask, dn_meta = gen(c["samples"])
        dn.update(label=dn_label, bbox=dn_bbox, mask=dn_mask, meta=dn_meta)

        class Fixed(torch.nn.Module):  # mmdet's draw, replayed when forward_transformer asks for one
            def __init__(self):
                super().__init__()
                self.label_embedding = gen.label_embedding

            def __call__(self, samples):
                return dn_label, dn_bbox, dn_mask, dn_meta

        tm.dn_query_generator = Fixed()
    try:
        with torch.set_grad_enabled(cotangents is not None):
            feats = tm.extract_feat(mr.nchw(c["x"]))
            head_in = tm.forward_transformer(feats, c["samples"])
            cls, coords = tm.bbox_head(head_in["hidden_states"], head_in["references"])
            if cotangents is not None:
                outs = {"cls_scores": cls, "bbox_preds": coords, "enc_cls_scores": head_in["enc_outputs_class"],
                        "enc_bbox_preds": head_in["enc_outputs_coord"]}
                sum((outs[k] * torch.from_numpy(v)).sum() for k, v in cotangents.items()).backward()
    finally:
        if train:
            tm.dn_query_generator = gen
        tm.eval()
    out = {"cls_scores": cls.detach().numpy(), "bbox_preds": coords.detach().numpy()}
    if train:
        out.update(enc_cls_scores=head_in["enc_outputs_class"].detach().numpy(),
                   enc_bbox_preds=head_in["enc_outputs_coord"].detach().numpy())
    if cotangents is not None:
        out["grads"] = {k: p.grad.numpy().copy() for k, p in tm.named_parameters() if p.grad is not None}
    return out, dn


def _denoising_from(dn, variant: str = "4scale_r50") -> Denoising:
    """mmdet's denoising queries as ours: each slot's label is the embedding row its query equals (-1: zeros)."""
    table = case(variant)["tm"].dn_query_generator.label_embedding.weight.detach()
    q = dn["label"].detach()
    eq = (q[:, :, None, :] == table[None, None]).all(-1)  # (B, D, K)
    assert torch.equal(eq.any(-1), q.abs().sum(-1) > 0), "a denoising query that is no label's embedding"
    labels = torch.where(eq.any(-1), eq.float().argmax(-1), torch.full(eq.shape[:2], -1)).numpy()
    b = q.shape[0]
    mask = np.broadcast_to(dn["mask"].numpy(), (b, *dn["mask"].shape))
    return Denoising(jnp.asarray(labels, jnp.int32), jnp.asarray(dn["bbox"].numpy()), jnp.asarray(mask))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_strict_import(variant):
    c = case(variant)
    report = c["report"]
    assert not report.missing and not report.unexpected and not report.ignored
    # Swin's relative_position_index buffers are constants the importer checks against ours, not variables
    assert set(report.loaded) == {k for k in c["tm"].state_dict() if not k.endswith("relative_position_index")}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_teacher_trunk_reads_the_backbone_and_neck(variant):
    """`make_model('channel_mapper')` (and its 5-scale twin), a DINO teacher's trunk, reads a DINO checkpoint's
    `backbone.*` and `neck.*` strictly (the transformer's keys ignored) and gives the same neck levels as mmdet's
    whole model."""
    c = case(variant)
    _, _, _, kwargs, trunk_name = VARIANTS[variant]
    trunk = make_model(trunk_name, backbone="resnet50" if variant == "4scale_r50" else "swin_large_384",
                       backbone_kwargs=kwargs["backbone_kwargs"])
    variables, report = interop.import_state_dict(trunk, c["tm"].state_dict())
    assert not report.missing and not report.unexpected
    assert report.ignored and all(not k.startswith(("backbone.", "neck.")) for k in report.ignored)
    ours = jax.jit(lambda v, x: trunk.apply(v, x, train=False))(variables, c["x"])
    with torch.no_grad():
        theirs = c["tm"].eval().extract_feat(mr.nchw(c["x"]))
    first = 3 if variant == "4scale_r50" else 2
    assert [k for k in ours if k.startswith("fpn.")] == [f"fpn.p{first + i}" for i in range(len(theirs))]
    for i, t in enumerate(theirs):
        assert_close(ours[f"fpn.p{first + i}"], mr.nhwc(t), rtol=1e-5, what=f"neck level {i}")


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train_with_denoising"])
def test_forward_matches_mmdet(train, variant):
    c = case(variant)
    want, dn = _theirs(train, variant=variant)
    denoising = _denoising_from(dn, variant) if train else None
    model = c["model"]

    @jax.jit
    def run(v, x, shapes, denoising):
        return model.apply(v, x, train=False, img_shapes=shapes, denoising=denoising)

    got = run(c["variables"], c["x"], c["img_shapes"], denoising)
    if train:
        assert got["cls_scores"].shape[2] == dn["meta"]["num_denoising_queries"] + Q
    for key, value in want.items():
        assert_close(got[key], value, rtol=1e-5, what=key)


@pytest.mark.slow  # 30 s: mmdet's backward through the ResNet and the transformer on the CPU
def test_gradients_match_mmdet():
    """The gradient of a weighted sum of every train-mode output (denoising included) with respect to every
    trainable parameter: the encoder, the decoder with its detached references and look-forward-twice boxes,
    the top-k gather into the encoder's proposals, the neck, the unfrozen backbone stages. Tolerance 1e-4
    relative to each parameter's largest gradient (float32 backward through the same stack)."""
    c = case()
    _, dn = _theirs(True)
    denoising = _denoising_from(dn)
    model = c["model"]

    def outputs(params):
        return model.apply({**c["variables"], "params": params}, c["x"], train=False, img_shapes=c["img_shapes"],
                           denoising=denoising)

    shapes = jax.eval_shape(outputs, c["variables"]["params"])
    rng = np.random.default_rng(5)
    keys = ("cls_scores", "bbox_preds", "enc_cls_scores", "enc_bbox_preds")
    cot = {k: rng.normal(size=shapes[k].shape).astype(np.float32) for k in keys}
    want, _ = _theirs(True, cot)

    @jax.jit
    def grads(params):
        return jax.grad(lambda p: sum(jnp.sum(outputs(p)[k] * cot[k]) for k in keys))(params)

    g = grads(c["variables"]["params"])
    ours = interop.export_state_dict(model, {**c["variables"], "params": g})
    theirs = want["grads"]
    # every trainable tensor has a gradient (mmdet freezes the stem, layer1 and every BatchNorm)
    assert len(theirs) == sum(p.requires_grad for p in c["tm"].parameters()) > 150
    for key, value in theirs.items():
        assert_close(ours[key], value, rtol=1e-4, what=key)


@pytest.mark.parametrize("arg,mmdet_config", [("", "dino-4scale_r50_8xb2-12e_coco.py"),
                                              ("teacher=dino_swin_l", "dino-5scale_swin-l_8xb2-12e_coco.py")])
def test_coco_detr_config_follows_mmdets_dino_recipe(arg, mmdet_config):
    """configs/coco_detr.py against mmdet's own DINO config (which the authors' distillation configs keep):
    optimizer, clip, backbone lr factor, schedule, batch, data filter and augmentation, queries."""
    import os

    from mmengine.config import Config

    from cankd_jax.config_arg import load_config

    ref = Config.fromfile(os.path.join(mr.CONFIGS, "dino", mmdet_config))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    c = load_config(os.path.join(root, "configs", "coco_detr.py"), arg)
    o, wrapper = c.optimizer, ref.optim_wrapper
    assert (o.name, o.lr, o.weight_decay) == ("adamw", wrapper.optimizer.lr, wrapper.optimizer.weight_decay)
    assert o.grad_clip_norm == wrapper.clip_grad.max_norm and wrapper.clip_grad.norm_type == 2
    assert dict(o.lr_mult) == {k: v.lr_mult for k, v in wrapper.paramwise_cfg.custom_keys.items()}
    epoch = c.total_steps // ref.train_cfg.max_epochs
    (step,) = ref.param_scheduler
    assert (step.type, step.by_epoch, step.gamma) == ("MultiStepLR", True, o.decay_factor)
    assert list(o.boundaries) == [m * epoch for m in step.milestones] and not o.warmup_steps
    assert c.batch_size == ref.auto_scale_lr.base_batch_size
    dataset = ref.train_dataloader.dataset
    assert dataset.filter_cfg.filter_empty_gt == c.data.filter_empty and dataset.filter_cfg.min_size == c.data.min_size
    assert c.data.augment == "detr" and [t["type"] for t in dataset.pipeline][2:4] == ["RandomFlip", "RandomChoice"]
    assert ref.model.dn_cfg.group_cfg.num_dn_queries == c.task.dn_queries
    student = models.make_network(c.student, num_classes=c.task.num_classes)
    assert student.num_queries == ref.model.num_queries and student.num_classes == ref.model.bbox_head.num_classes
    assert len(c.distill) == (3 if not arg else 4) and {t["options"]["loss_weight"] for t in c.distill} == {10.0}
    # the authors' students leave frozen_stages out (nlkd_dino-r101_dino-r50_12e_coco.py comments out mmdet's 1)
    assert student.backbone.frozen_stages == -1


@pytest.mark.parametrize("variant,arg", [("4scale_r50", ""), ("5scale_swin", "teacher=dino_swin_l")])
def test_student_inherits_what_the_authors_configs_load_from_the_teacher(tmp_path, variant, arg):
    """configs/coco_detr.py's `inherit_prefixes` on an mmdet DINO checkpoint: the student's encoder, decoder and
    head (R50: and neck) are the checkpoint's, exactly as mmengine's `Pretrained` init_cfg with those prefixes
    loads them; the backbone, queries, level embedding, memory projection and denoising labels keep their own."""
    import os

    import ml_collections
    from flax import traverse_util

    from cankd_jax.config_arg import load_config
    from cankd_jax.train.weights import load_pretrained

    c = case(variant)
    torch.save({"state_dict": c["tm"].state_dict()}, tmp_path / "teacher.pth")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = load_config(os.path.join(root, "configs", "coco_detr.py"), arg)
    cfg = ml_collections.ConfigDict(dict(pretrained="", inherit="teacher",
                                         inherit_prefixes=config.student.inherit_prefixes,
                                         inherit_skip_mismatched=config.student.inherit_skip_mismatched))
    x = jnp.asarray(c["x"])
    loaded = load_pretrained(cfg, c["model"], x, teacher_cfg={"checkpoint": str(tmp_path / "teacher.pth")})
    layout = interop.state_dict_layout(c["model"], sample=x)
    by_path = {(entry.collection, *entry.path): key for key, entry in layout.items()}
    keys = {by_path[k] for k in loaded}
    prefixes = tuple(p for p, _ in config.student.inherit_prefixes)
    expected = {k for k in layout if k.startswith(prefixes)}
    assert keys == expected and len(keys) > 20
    assert ("neck." in prefixes) == (variant == "4scale_r50")
    flat = traverse_util.flatten_dict(c["variables"])  # the checkpoint's values, imported strictly
    for path, value in loaded.items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(flat[path]), err_msg=by_path[path])
