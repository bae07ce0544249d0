"""Detection (RetinaNet, FCOS, RepPoints, Faster R-CNN, DINO): mmdet's training targets and losses, its test-time
post-processing inside the jitted evaluation, and pycocotools' COCOeval on the host. The building blocks (boxes, anchors,
assigners, samplers, losses, NMS, RoIAlign, proposals) are `cankd_jax.detection`'s."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import logging
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from cankd_jax import detection as det
from cankd_jax.detection import dino, rcnn, reppoints, rpn
from cankd_jax.detection.samplers import sample_key
from cankd_jax.models.dino import DINO

log = logging.getLogger(__name__)


DETECTOR_NMS = None  # DetectionTask.iou_threshold: the detector's own NMS threshold (its mmdet test config's)


@dataclasses.dataclass(frozen=True)
class DetectionTask:
    """Detection (`detector` 'retinanet', 'fcos', 'reppoints' or 'faster_rcnn'): mmdet's training losses, COCO mAP.

    `loss(outputs, labels)`: the student's per-level head outputs (`cls_scores`,
    `bbox_preds`, FCOS `centernesses`) against the batch's padded ground truth
    (`labels`: `boxes (B, G, 4)` pixels of the network input, `labels (B, G)`,
    `valid (B, G)`, `pad_shape (B, 2)`, `img_shape (B, 2)`; `data/detection.py`). Targets
    are built per image (vmapped, static shapes) by `cankd_jax.detection`: RetinaNet's
    max-IoU assignment on anchors valid within each image's `pad_shape`, FCOS's
    centre-sampled points with regress ranges. Terms: `loss_cls` (focal), `loss_bbox`
    (L1 on deltas / GIoU weighted by centerness targets) and FCOS's `loss_centerness`
    (BCE), each normalised over the global batch (mmdet's numbers on one device). RepPoints: the point
    assigner's init stage and the max-IoU refine stage on the detached initial boxes, `loss_cls`,
    `loss_pts_init`, `loss_pts_refine` (`cankd_jax.detection.reppoints`).

    `eval_outputs`: mmdet's test-time post-processing inside the jitted evaluation
    (per level the top `nms_pre` (anchor, class) pairs above `score_thr`; decode; clip
    to the resized image; back to the original image by the scale factor; class-aware
    NMS at `iou_threshold` (`DETECTOR_NMS`, the default: the detector's test config's, 0.5 RetinaNet / 0.6
    FCOS); the best
    `max_per_img`), plus the image ids and valid flags. `accumulate` gathers them on the
    host; `summarize` runs COCOeval (bbox) against `ground_truth`, the eval split in
    COCO's format (`with_data` sets it and `category_ids`, the map from contiguous
    labels back to the data set's category ids). Metrics: `mAP` (AP at IoU
    0.50:0.95), `AP50`, `AP75`, `AP_S`, `AP_M`, `AP_L` (-1 where the split has no
    object of that size, as COCOeval), fractions in [0, 1].

    Faster R-CNN (`faster_rcnn`): `apply_kwargs` gives the student's call a RoI sampler. In training it takes
    the RPN's proposals (`train_proposals`: mmdet's nms_pre 2000, 1000 per image), samples 256 anchors and
    `roi_samples` (512) RoIs per image with keys
    derived from the step's key and the image's index in the global batch (`samplers.sample_key`: the same
    draw on any number of devices), and returns the RPN's targets and the sampled RoIs, which the box head
    then classifies; `loss` adds `loss_rpn_cls`, `loss_rpn_bbox` (`rpn.rpn_loss`), `loss_cls`, `loss_bbox`
    (`rcnn.rcnn_loss`). At test time it gives the RPN's test proposals (`test_proposals`: 1000, 1000; clipped to
    each image) and `detect` is the box head's post-processing (`rcnn.rcnn_postprocess`: score 0.05, NMS 0.5,
    100 per image, unless `score_thr` / `iou_threshold` / `max_per_img` say otherwise).

    DINO (`dino`): `apply_kwargs` gives the student's call each image's `img_shapes` (its padding is masked out
    of the transformer) and, in training, the contrastive denoising queries (`cankd_jax.detection.dino`:
    `dn_queries` (100) sizing the groups, label noise 0.5, box noise 1.0), drawn from keys of (seed, step,
    image index in the global batch). `loss` is every term of mmdet's `DINOHead.loss_by_feat` (Hungarian
    matching on each decoder layer and the encoder's proposals, the denoising targets); `detect` keeps the
    `max_per_img` best (query, class) pairs of the last layer (DINO's config: 300), no NMS. `num_queries` comes
    from the student (`for_detector`).

    `strides`: the neck levels' (P3-P7; P2-P6 for Faster R-CNN); `norm_on_bbox`: FCOS's head setting (its
    training distances in strides). A run takes both from the student's head
    (`for_detector`), so the network is their one source; a config that sets either
    to another value is refused.
    """

    num_classes: int
    detector: str = "retinanet"
    strides: tuple[int, ...] = (8, 16, 32, 64, 128)
    norm_on_bbox: bool = True
    score_thr: float = 0.05
    nms_pre: int = 1000
    iou_threshold: Optional[float] = None  # DETECTOR_NMS
    max_per_img: int = 100
    # Faster R-CNN: mmdet's (nms_pre, max_per_img) of train_cfg.rpn_proposal and test_cfg.rpn, and
    # train_cfg.rcnn.sampler.num; configs/detection_demo.py scales them to its 128x128 images
    train_proposals: tuple[int, int] = (rpn.RPN_TRAIN_PROPOSALS.nms_pre, rpn.RPN_TRAIN_PROPOSALS.max_per_img)
    test_proposals: tuple[int, int] = (rpn.RPN_TEST_PROPOSALS.nms_pre, rpn.RPN_TEST_PROPOSALS.max_per_img)
    roi_samples: int = rcnn.RCNN_TRAIN_CFG.num
    # DINO: the denoising queries the groups are sized from (mmdet's dn_cfg.group_cfg.num_dn_queries), and the
    # student's matching queries (set by for_detector)
    dn_queries: int = 100
    num_queries: int = 900
    metric: str = "mAP"
    category_ids: tuple[int, ...] = dataclasses.field(default=(), metadata={"internal": True})
    ground_truth: Optional[dict] = dataclasses.field(default=None, compare=False, repr=False,
                                                     metadata={"internal": True})

    DETECTORS = ("retinanet", "fcos", "reppoints", "faster_rcnn", "dino")

    def __post_init__(self):
        if self.detector not in self.DETECTORS:
            raise ValueError(f"unknown task.detector {self.detector!r}; choose one of {', '.join(self.DETECTORS)}")
        object.__setattr__(self, "strides", tuple(int(s) for s in self.strides))
        for name in ("train_proposals", "test_proposals"):
            value = tuple(int(v) for v in getattr(self, name))
            if len(value) != 2 or min(value) < 1:
                raise ValueError(f"task.{name} is (nms_pre, max_per_img), two positive counts; got {value}")
            object.__setattr__(self, name, value)
        if self.roi_samples < 1:
            raise ValueError(f"task.roi_samples must be positive; got {self.roi_samples}")
        # The post-processing's limits: 0 failed only at the first evaluation, after training; a threshold out of
        # range gave no detections (mAP 0) or no suppression, silently.
        for name in ("nms_pre", "max_per_img"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"task.{name} must be a positive count of boxes; got {getattr(self, name)}")
        if not 0 <= float(self.score_thr) < 1:
            raise ValueError(f"task.score_thr must be in [0, 1) (a sigmoid or softmax score); got {self.score_thr}")
        if self.iou_threshold is not DETECTOR_NMS and not 0 <= float(self.iou_threshold) <= 1:
            raise ValueError(f"task.iou_threshold must be in [0, 1], or None for the detector's own; got "
                             f"{self.iou_threshold}")

    def for_detector(self, detector: Any, cfg: Mapping[str, Any]) -> DetectionTask:
        """This task matched to the student: its kind (from its head), its levels' strides, and FCOS's
        `norm_on_bbox` (from its head). `cfg` (the `config.task` block) may name these only with those values."""
        head = getattr(detector, "bbox_head", None) or getattr(detector, "rpn_head", None)
        kind = {"RetinaHead": "retinanet", "FCOSHead": "fcos", "RepPointsHead": "reppoints",
                "RPNHead": "faster_rcnn"}.get(type(head).__name__)
        what = f"head is a {type(head).__name__}"
        if isinstance(detector, DINO):
            kind, what = "dino", "network is a DINO"
        if kind != self.detector:
            raise ValueError(f"task.detector={self.detector!r} but the student's {what}"
                             + (f"; set task.detector to {kind!r}" if kind else ", which this task has no targets for"))
        fields = {"strides": tuple(int(s) for s in detector.level_strides())}
        self._check_head(kind, head, fields["strides"])
        if kind == "dino":
            fields["num_queries"] = int(detector.num_queries)
        if kind == "fcos":
            fields["norm_on_bbox"] = bool(head.norm_on_bbox)
        for key, value in fields.items():
            given = cfg.get(key)
            if given is not None and (tuple(given) if key == "strides" else type(value)(given)) != value:
                raise ValueError(f"task.{key}={given} but the student has {key}={value}; the training targets follow "
                                 f"the student: drop task.{key} (or change the student's network config)")
        return dataclasses.replace(self, **fields)

    @staticmethod
    def _check_head(kind: str, head: Any, strides: tuple[int, ...]) -> None:
        """The targets' fixed parts against the student's head: anchors per position, FCOS's regress ranges per
        level (else a shape assertion deep in the first step's loss)."""
        if kind in ("retinanet", "faster_rcnn"):
            generator = rpn.RPN_ANCHORS if kind == "faster_rcnn" else det.AnchorGenerator(strides=strides)
            if int(head.num_anchors) != generator.num_base_anchors:
                raise ValueError(f"the student's {type(head).__name__} has num_anchors={head.num_anchors}, but "
                                 f"{kind}'s anchor generator places {generator.num_base_anchors} at each position; "
                                 f"set the head's num_anchors to {generator.num_base_anchors}")
        if kind == "fcos" and len(strides) != len(det.FCOS_REGRESS_RANGES):
            raise ValueError(f"an FCOS student needs {len(det.FCOS_REGRESS_RANGES)} levels, one per regress range "
                             f"{det.FCOS_REGRESS_RANGES}; this one has {len(strides)} (strides {strides}): give its "
                             f"neck num_outs={len(det.FCOS_REGRESS_RANGES)} and its head one stride per level")

    def with_data(self, data: Any) -> DetectionTask:
        """This task scoring against `data`'s eval split (its COCO ground truth and category ids)."""
        if data.num_classes != self.num_classes:
            raise ValueError(f"task.num_classes={self.num_classes} but data set {data.name!r} has "
                             f"{data.num_classes} classes")
        return dataclasses.replace(self, category_ids=tuple(data.category_ids), ground_truth=data.coco_ground_truth())

    @property
    def postprocess_config(self) -> det.PostprocessConfig:
        default = {"retinanet": det.RETINANET_TEST_CFG, "reppoints": reppoints.REPPOINTS_TEST_CFG}.get(
            self.detector, det.FCOS_TEST_CFG)
        return det.PostprocessConfig(score_thr=self.score_thr, nms_pre=self.nms_pre,
                                     iou_threshold=default.iou_threshold if self.iou_threshold is DETECTOR_NMS
                                     else self.iou_threshold,
                                     max_per_img=self.max_per_img)

    def _levels(self, outputs: Mapping[str, Any]) -> tuple[list[tuple[int, int]], tuple[int, ...]]:
        sizes = [tuple(int(d) for d in m.shape[1:3]) for m in outputs["cls_scores"]]
        if len(sizes) != len(self.strides):
            raise ValueError(f"the detector has {len(sizes)} levels but task.strides={self.strides}")
        return sizes, self.strides

    def apply_kwargs(self, data: Mapping[str, Any], *, train: bool, key: Optional[jax.Array] = None) -> dict:
        """Faster R-CNN: the `roi_sampler` of the student's call; DINO: `img_shapes` and in training `denoising`
        (see the class docstring); nothing otherwise.
        `data`: the batch's labels (training, with the step's sampling `key`) or the eval batch."""
        if self.detector == "dino":
            return self._dino_kwargs(data, train=train, key=key)
        if self.detector != "faster_rcnn":
            return {}
        img_shapes = data["img_shape"]
        if not train:
            def test_rois(rpn_out):
                props = rpn.proposals(rpn_out["rpn_cls_scores"], rpn_out["rpn_bbox_preds"], img_shapes,
                                      cfg=self._proposal_config(self.test_proposals, rpn.RPN_TEST_PROPOSALS))
                rois, _ = rpn.proposal_rois(props)
                # per image (B, M, 5): each image's RoIs read its own maps, on whichever device holds it
                return rois.reshape(*props.valid.shape, 5), {"proposals": props}

            return {"roi_sampler": test_rois}
        if key is None:
            raise ValueError("DetectionTask.apply_kwargs: Faster R-CNN's training needs a sampling key")
        k = self.num_classes
        gt = (data["boxes"], data["labels"], data["valid"])

        def train_rois(rpn_out):
            sizes = [tuple(int(d) for d in m.shape[1:3]) for m in rpn_out["rpn_cls_scores"]]
            props = rpn.proposals(rpn_out["rpn_cls_scores"], rpn_out["rpn_bbox_preds"], img_shapes,
                                  cfg=self._proposal_config(self.train_proposals, rpn.RPN_TRAIN_PROPOSALS))
            anchors = np.concatenate(rpn.RPN_ANCHORS.grid_anchors(sizes))
            b = img_shapes.shape[0]

            def one(index, pad_shape, boxes, gt_labels, valid, proposals, proposal_valid):
                image_key = sample_key(key, 0, index)  # the step is already folded into `key`
                flags = jnp.concatenate(rpn.RPN_ANCHORS.valid_flags(sizes, pad_shape))
                rpn_t = rpn.rpn_targets_single(anchors, flags, boxes, valid, jax.random.fold_in(image_key, 0))
                roi_s = rcnn.rcnn_sample_single(proposals, proposal_valid, boxes, gt_labels, valid,
                                                jax.random.fold_in(image_key, 1), num_classes=k,
                                                cfg=dataclasses.replace(rcnn.RCNN_TRAIN_CFG, num=self.roi_samples))
                return rpn_t, roi_s

            rpn_t, roi_s = jax.vmap(one)(jnp.arange(b), data["pad_shape"], *gt, props.boxes, props.valid)
            rois = rcnn.sample_rois(roi_s).reshape(b, -1, 5)  # per image, as the test RoIs
            return rois, {"rpn_targets": rpn_t, "roi_samples": roi_s}

        return {"roi_sampler": train_rois}

    def _dino_kwargs(self, data: Mapping[str, Any], *, train: bool, key: Optional[jax.Array]) -> dict:
        img_shapes = data["img_shape"]
        if not train:
            return {"img_shapes": img_shapes}
        if key is None:
            raise ValueError("DetectionTask.apply_kwargs: DINO's denoising queries need a sampling key")
        layout = dino.dn_layout(data["valid"], self.dn_queries)
        b, d = layout.gt.shape

        def draw(index):  # each image's own draws, whichever device holds it
            return jax.tree.map(lambda a: a[0], dino.dn_noise(sample_key(key, 0, index), 1, d, self.num_classes))

        noise = jax.vmap(draw)(jnp.arange(b))
        denoising = dino.cdn_queries(noise, layout, data["boxes"], data["labels"], img_shapes,
                                     num_matching_queries=self.num_queries)
        return {"img_shapes": img_shapes, "denoising": denoising}

    @staticmethod
    def _proposal_config(counts: tuple[int, int], default: rpn.ProposalConfig) -> rpn.ProposalConfig:
        return dataclasses.replace(default, nms_pre=counts[0], max_per_img=counts[1])

    def targets(self, outputs: Mapping[str, Any], labels: Mapping[str, jax.Array]) -> Any:
        """The batch's training targets, per image (vmapped): `RetinaNetTargets` over the anchors (valid within
        each image's `pad_shape`), or `FCOSTargets` over the points; every leaf with a leading batch axis."""
        sizes, strides = self._levels(outputs)
        k = self.num_classes
        gt = (labels["boxes"], labels["labels"], labels["valid"])
        if self.detector == "retinanet":
            gen = det.AnchorGenerator(strides=strides)
            anchors = np.concatenate(gen.grid_anchors(sizes))

            def one(pad_shape, boxes, gt_labels, valid):
                flags = jnp.concatenate(gen.valid_flags(sizes, pad_shape))
                return det.retinanet_targets(anchors, flags, boxes, gt_labels, valid, num_classes=k)

            return jax.vmap(one)(labels["pad_shape"], *gt)
        if self.detector == "reppoints":
            points, point_strides = reppoints.level_points(sizes, strides)
            pts_init = det.flatten_level_maps(outputs["pts_preds_init"], outputs["pts_preds_init"][0].shape[-1])
            proposals = reppoints.proposal_boxes(pts_init, outputs["moment_transfer"], points, point_strides)

            def one_image(pad_shape, props, boxes, gt_labels, valid):
                flags = reppoints.point_valid_flags(sizes, strides, pad_shape)
                return reppoints.reppoints_targets(props, points, point_strides, flags, boxes, gt_labels, valid,
                                                   num_classes=k)

            return jax.vmap(one_image)(labels["pad_shape"], proposals, *gt)
        priors = det.fcos_priors(sizes, strides)
        return jax.vmap(lambda b, l, v: det.fcos_targets(priors, b, l, v, num_classes=k,
                                                         norm_on_bbox=self.norm_on_bbox))(*gt)

    def loss(self, outputs: Mapping[str, Any], labels: Mapping[str, jax.Array]) -> tuple[jax.Array, dict]:
        if self.detector == "faster_rcnn":
            if "rpn_targets" not in outputs:
                raise ValueError("Faster R-CNN's loss needs the outputs of a call with DetectionTask.apply_kwargs' "
                                 "roi_sampler (the RPN's targets and the sampled RoIs)")
            cls = jnp.concatenate([m.reshape(m.shape[0], -1) for m in outputs["rpn_cls_scores"]], 1)
            reg = det.flatten_level_maps(outputs["rpn_bbox_preds"], 4)
            terms = {**rpn.rpn_loss(cls, reg, outputs["rpn_targets"]),
                     **rcnn.rcnn_loss(outputs["roi_cls_scores"], outputs["roi_bbox_preds"], outputs["roi_samples"])}
            return sum(terms.values()), terms
        if self.detector == "dino":
            layout = dino.dn_layout(labels["valid"], self.dn_queries)
            terms = dino.dino_losses(outputs, labels["boxes"], labels["labels"], labels["valid"], labels["img_shape"],
                                     num_classes=self.num_classes, num_dn=layout.gt.shape[1], layout=layout)
            return sum(terms.values()), terms
        k = self.num_classes
        cls = det.flatten_level_maps(outputs["cls_scores"], k)
        targets = self.targets(outputs, labels)
        if self.detector == "reppoints":
            sizes, strides = self._levels(outputs)
            n2 = outputs["pts_preds_init"][0].shape[-1]
            terms = reppoints.reppoints_loss(cls, det.flatten_level_maps(outputs["pts_preds_init"], n2),
                                             det.flatten_level_maps(outputs["pts_preds_refine"], n2),
                                             outputs["moment_transfer"], *reppoints.level_points(sizes, strides),
                                             targets)
            return sum(terms.values()), terms
        reg = det.flatten_level_maps(outputs["bbox_preds"], 4)
        if self.detector == "retinanet":
            terms = det.retinanet_loss(cls, reg, targets)
        else:
            sizes, strides = self._levels(outputs)
            ctr = det.flatten_level_maps(outputs["centernesses"], 1)[..., 0]
            terms = det.fcos_loss(cls, reg, ctr, det.fcos_priors(sizes, strides), targets)
        return sum(terms.values()), terms

    def detect(self, outputs: Mapping[str, Any], img_shapes: jax.Array, scale_factors: jax.Array) -> det.Detections:
        """Inference-mode head outputs -> `Detections` in original-image pixels (jit-able)."""
        if self.detector == "faster_rcnn":
            props = outputs["proposals"]
            b, m = props.valid.shape
            cfg = rcnn.RCNNTestConfig(score_thr=self.score_thr, max_per_img=self.max_per_img,
                                      iou_threshold=rcnn.RCNN_TEST_CFG.iou_threshold
                                      if self.iou_threshold is DETECTOR_NMS else self.iou_threshold)
            return rcnn.rcnn_postprocess(props.boxes, props.valid, outputs["roi_cls_scores"].reshape(b, m, -1),
                                         outputs["roi_bbox_preds"].reshape(b, m, -1), img_shapes, scale_factors,
                                         cfg=cfg)
        if self.detector == "dino":
            return dino.dino_postprocess(outputs["cls_scores"][-1], outputs["bbox_preds"][-1], img_shapes,
                                         scale_factors, max_per_img=self.max_per_img)
        sizes, strides = self._levels(outputs)
        b, k, cfg = outputs["cls_scores"][0].shape[0], self.num_classes, self.postprocess_config
        cls = [m.reshape(b, -1, k) for m in outputs["cls_scores"]]
        reg = [m.reshape(b, -1, 4) for m in outputs["bbox_preds"]]
        if self.detector == "retinanet":
            anchors = det.AnchorGenerator(strides=strides).grid_anchors(sizes)
            return det.retinanet_postprocess(cls, reg, anchors, img_shapes, scale_factors, cfg=cfg)
        if self.detector == "reppoints":
            points = det.grid_points(sizes, strides, offset=0.0)  # mmdet's MlvlPointGenerator(offset=0.)
            return reppoints.reppoints_postprocess(cls, reg, points, strides, img_shapes, scale_factors, cfg=cfg)
        ctr = [m.reshape(b, -1) for m in outputs["centernesses"]]
        # The head's inference distances are already pixels (x stride with norm_on_bbox, exp otherwise).
        return det.fcos_postprocess(cls, reg, ctr, det.grid_points(sizes, strides), (1,) * len(sizes), img_shapes,
                                    scale_factors, cfg=cfg)

    def eval_outputs(self, outputs: Mapping[str, Any], batch: Mapping[str, Any]) -> dict[str, jax.Array]:
        """Detections of the batch (`max_per_img` rows per image) with the image ids and valid flags."""
        d = self.detect(outputs, batch["img_shape"], batch["scale_factor"])
        return {"boxes": d.boxes, "scores": d.scores, "labels": d.labels, "num_valid": d.num_valid,
                "image_id": batch["image_id"], "valid": batch["valid"]}

    def accumulate(self, total: Optional[list], outputs: Mapping[str, np.ndarray]) -> list:
        """Append the batch's detections as COCO result rows `[image_id, x, y, w, h, score, category_id]`."""
        total = [] if total is None else total
        ids = np.asarray(self.category_ids or range(1, self.num_classes + 1), np.float64)
        for i in np.flatnonzero(np.asarray(outputs["valid"])):
            n = int(outputs["num_valid"][i])
            boxes = np.asarray(outputs["boxes"][i][:n], np.float64)
            rows = np.empty((n, 7), np.float64)
            rows[:, 0] = int(outputs["image_id"][i])
            rows[:, 1:3] = boxes[:, :2]
            rows[:, 3:5] = boxes[:, 2:] - boxes[:, :2]
            rows[:, 5] = outputs["scores"][i][:n]
            rows[:, 6] = ids[np.asarray(outputs["labels"][i][:n])]
            total.append(rows)
        return total

    def summarize(self, total: Optional[list]) -> dict[str, float]:
        return coco_eval(self.ground_truth, np.concatenate(total) if total else np.zeros((0, 7)))


COCO_METRICS = ("mAP", "AP50", "AP75", "AP_S", "AP_M", "AP_L")
COCO_AREAS = ((0.0, 32.0**2), (32.0**2, 96.0**2), (96.0**2, 1e10))  # COCOeval's small / medium / large


def coco_eval(ground_truth: Optional[dict], results: np.ndarray) -> dict[str, float]:
    """pycocotools' bbox COCOeval of `results` (`(N, 7)` rows `[image_id, x, y, w, h, score, category_id]`)
    against `ground_truth` (a COCO-format dict): AP at IoU 0.50:0.95 (`mAP`), 0.5, 0.75, and per object size."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if ground_truth is None:
        raise ValueError("the detection task has no ground truth to score against (DetectionTask.with_data)")
    if not len(results):  # COCOeval cannot load an empty result list: 0, or -1 where no object is of that size
        areas = [a["area"] for a in ground_truth["annotations"] if not a.get("iscrowd")]
        present = [bool(areas), *(any(lo <= a < hi for a in areas) for lo, hi in COCO_AREAS)]
        return {name: 0.0 if p else -1.0 for name, p in zip(COCO_METRICS, [present[0]] * 2 + present)}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # pycocotools prints its progress and table
        gt = COCO()
        gt.dataset = copy.deepcopy(ground_truth)
        gt.createIndex()
        evaluator = COCOeval(gt, gt.loadRes(np.asarray(results, np.float64)), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    log.info("COCOeval:\n%s", "\n".join(line for line in printed.getvalue().splitlines() if line.startswith(" Average")))
    return {name: float(v) for name, v in zip(COCO_METRICS, evaluator.stats[:6])}
