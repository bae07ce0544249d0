"""RoIAlign (`cankd_jax.detection.roi_align`) against mmcv 2.1's own op and mmdetection 3.3's `SingleRoIExtractor`.

mmcv's `RoIAlign` runs its CPU kernel, here the torch port in `mmcv_ext.py` (itself held to a literal
transcription of the C++ in `test_mmcv_ext.py`); mmdet's extractor is built from the config of its Faster
R-CNN (`RoIAlign(7, sampling_ratio=0)`, strides 4-32, finest scale 56). Values and the gradient with respect
to the features (mmcv's backward kernel) are compared. Tolerance: a bin averages up to `gh gw` samples of four
taps, summed in a different order here (per tap over all samples, then over the four taps) than in the kernel's
loop (per sample over its four taps), and a feature pixel's gradient sums the contributions of every RoI
sampling it, in a different order again, so float32 rounding differs: each element may differ by 1e-5 of
the sum of its terms' magnitudes (`_magnitude`: the same computation on |input| and |cotangent|), the
float32 bound for sums of this length with room to spare.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import openmmlab_reference as mr
from cankd_jax.detection.roi_align import extract_roi_features, map_roi_levels, max_grid_samples, roi_align

pytestmark = pytest.mark.skipif(mr.available() is not None, reason=str(mr.available()))

REL = 1e-5


def _assert_close(actual, desired, magnitude, rel: float = REL):
    actual, desired, magnitude = (np.asarray(a, np.float64) for a in (actual, desired, magnitude))
    bound = rel * magnitude + 1e-30
    worst = np.max(np.abs(actual - desired) - bound)
    assert worst <= 0, (f"differs beyond float32 rounding: max |diff| {np.max(np.abs(actual - desired)):.3g}, "
                        f"at the worst element {worst:.3g} over its bound")


def _magnitude(f, x, cotangent):
    """(sum of |terms| of each output, of each input-gradient element): `f` on |x|, its VJP of |cotangent|."""
    y, vjp = jax.vjp(f, jax.tree.map(jnp.abs, x))
    return y, vjp(jnp.abs(cotangent))[0]


def _rois(rng: np.random.Generator, n: int, batch: int, height: float, width: float) -> np.ndarray:
    """RoIs of every kind the kernel treats apart: inside, partly and wholly outside the map, under a pixel,
    empty (x1 == x2), wide and tall."""
    cx, cy = rng.uniform(-0.2 * width, 1.2 * width, n), rng.uniform(-0.2 * height, 1.2 * height, n)
    w = rng.choice([0.0, 0.3, 3.0, 11.0, 0.5 * width, 0.9 * width], n) * rng.uniform(0.8, 1.2, n)
    h = rng.choice([0.0, 0.6, 4.0, 9.0, 0.5 * height, 0.9 * height], n) * rng.uniform(0.8, 1.2, n)
    b = rng.integers(0, batch, n)
    return np.stack([b, cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1).astype(np.float32)


def _mmcv_roi_align(feat: np.ndarray, rois: np.ndarray, cotangent: np.ndarray, stride: int, sampling_ratio: int,
                    aligned: bool):
    from mmcv.ops import roi_align as mmcv_roi_align

    x = torch.tensor(mr.nchw(feat), requires_grad=True)
    y = mmcv_roi_align(x, torch.from_numpy(rois), (7, 7), 1.0 / stride, sampling_ratio, "avg", aligned)
    (y * mr.nchw(cotangent)).sum().backward()
    return mr.nhwc(y), mr.nhwc(x.grad)


@pytest.mark.parametrize("sampling_ratio, aligned, stride, tiered", [(0, True, 4, True), (0, False, 8, True),
                                                                     (2, True, 8, True), (0, True, 1, True),
                                                                     (0, True, 4, False)])
def test_roi_align_matches_mmcv(sampling_ratio, aligned, stride, tiered):
    """Both forms: RoIs sorted by their grids with each chunk of 16 on its own static grid (`tiered`), and the
    static bound (36 points per bin here) for every RoI."""
    rng = np.random.default_rng(sampling_ratio + 10 * stride + aligned)
    feat = rng.standard_normal((2, 13, 17, 3)).astype(np.float32)
    rois = _rois(rng, 40, 2, 13 * stride, 17 * stride)
    cotangent = rng.standard_normal((40, 7, 7, 3)).astype(np.float32)
    y_ref, gx_ref = _mmcv_roi_align(feat, rois, cotangent, stride, sampling_ratio, aligned)

    def f(x):
        return roi_align([x], jnp.asarray(rois), jnp.zeros(40, jnp.int32), [stride], sampling_ratio=sampling_ratio,
                         aligned=aligned, max_samples=max(4, 3 * 3 * 4), chunk=16, tiered=tiered)

    y, vjp = jax.vjp(jax.jit(f), jnp.asarray(feat))
    (gx,) = vjp(jnp.asarray(cotangent))
    y_mag, gx_mag = _magnitude(jax.jit(f), jnp.asarray(feat), jnp.asarray(cotangent))
    _assert_close(y, y_ref, y_mag)
    _assert_close(gx, gx_ref, gx_mag)
    assert np.abs(y).max() > 0.1 and np.abs(gx).max() > 0.1  # the RoIs do read the map


def _mmdet_extractor(channels: int):
    from mmdet.registry import MODELS
    from mmengine.config import Config
    from mmengine.registry import DefaultScope

    cfg = Config.fromfile(f"{mr.CONFIGS}/_base_/models/faster-rcnn_r50_fpn.py").model.roi_head.bbox_roi_extractor
    cfg.out_channels = channels
    with DefaultScope.overwrite_default_scope("mmdet"):
        return MODELS.build(cfg), list(cfg.featmap_strides)


def test_extractor_matches_mmdet_single_roi_extractor():
    """mmdet's Faster R-CNN RoI extractor on a 4-level pyramid of a 320x640 padded batch: the level mapping, and
    features and gradients of RoIs on every level, including elongated ones that need the most grid points
    the level mapping allows (48 per bin at P2 of 800x1344; here `max_grid_samples` of these shapes). In
    float64 (mmcv's kernel is a template on the float type), so that the bound is 1e-12 of each element's
    terms: a pixel's gradient sums thousands of terms here, whose float32 rounding would hide a small error."""
    extractor, strides = _mmdet_extractor(channels=4)
    assert strides == [4, 8, 16, 32]
    rng = np.random.default_rng(0)
    in_h, in_w = 320, 640
    feats = [rng.standard_normal((2, in_h // s, in_w // s, 4)) for s in strides]
    rois = np.concatenate([
        _rois(rng, 60, 2, in_h, in_w),
        # The widest RoI each level takes: 3 px tall, as wide as the input (level 0), and a full-size one.
        np.asarray([[0, 0, 10, 640, 13], [1, 2, 0, 5, 320], [0, 0, 0, 640, 320], [1, 20, 30, 330, 270]], np.float32),
    ])
    rois[:, 1:] = np.clip(rois[:, 1:], [0, 0, 0, 0], [in_w, in_h, in_w, in_h])  # as proposals are: in the image
    levels = map_roi_levels(jnp.asarray(rois), 4)
    np.testing.assert_array_equal(levels, extractor.map_roi_levels(torch.from_numpy(rois), 4).numpy())
    assert set(np.asarray(levels).tolist()) == {0, 1, 2, 3}
    cotangent = rng.standard_normal((len(rois), 7, 7, 4))

    def nchw64(x):
        return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))

    xs = [nchw64(f).requires_grad_(True) for f in feats]
    y_ref = extractor(xs, torch.from_numpy(rois.astype(np.float64)))
    (y_ref * nchw64(cotangent)).sum().backward()
    with jax.enable_x64():
        def f(fs):
            return extract_roi_features(fs, jnp.asarray(rois, jnp.float64), strides, chunk=16)

        y, vjp = jax.vjp(jax.jit(f), [jnp.asarray(x) for x in feats])
        (grads,) = vjp(jnp.asarray(cotangent))
        y_mag, g_mag = _magnitude(jax.jit(f), [jnp.asarray(x) for x in feats], jnp.asarray(cotangent))
    assert y.dtype == jnp.float64
    _assert_close(y, mr.nhwc(y_ref), y_mag, rel=1e-12)
    for g, x, m in zip(grads, xs, g_mag):
        _assert_close(g, mr.nhwc(x.grad), m, rel=1e-12)
        assert np.abs(np.asarray(g)).max() > 0.1  # every level is read


def test_grid_bound_at_coco_size_and_nan_beyond_it():
    """The static bound: 48 grid points per bin at 800x1344 (P2's widest RoI a level-0 box can be: 1344 px
    wide, under 28 px tall); a RoI the bound does not cover (longer than the input) gets NaN, never a
    truncated average."""
    assert max_grid_samples([(200, 336), (100, 168), (50, 84), (25, 42)], [4, 8, 16, 32]) == 48
    assert max_grid_samples([(200, 336)], [4], sampling_ratio=2) == 4
    feats = [jnp.ones((1, 8, 8, 2)), jnp.ones((1, 4, 4, 2))]
    rois = jnp.asarray([[0, 0, 0, 30, 30], [0, 0, 0, 400, 30]], jnp.float32)
    y = roi_align(feats, rois, jnp.asarray([1, 1]), [4, 8])
    assert np.isfinite(np.asarray(y[0])).all() and np.isnan(np.asarray(y[1])).all()


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="2 feature levels but 1 strides"):
        roi_align([jnp.ones((1, 4, 4, 2))] * 2, jnp.zeros((1, 5)), jnp.zeros(1, jnp.int32), [4])
    with pytest.raises(ValueError, match=r"different channel counts \[2, 3\]"):
        roi_align([jnp.ones((1, 4, 4, 2)), jnp.ones((1, 2, 2, 3))], jnp.zeros((1, 5)), jnp.zeros(1, jnp.int32),
                  [4, 8])


@pytest.mark.slow  # heavy: the slow tier keeps the quick one near 5 minutes
def test_per_image_rois_give_the_same_numbers_and_need_no_communication():
    """RoIs given per image `(B, M, 5)` (what the detection task passes) equal the `(B M, 5)` rows, values and
    gradients; and with the batch split over 4 devices the per-image form compiles to a program without any
    collective, where the rows form gathers the other devices' maps (the pod rehearsal found that: Faster R-CNN
    sent 12 GB per device per step on 64 devices)."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from cankd_jax.detection.roi_align import batch_rois
    from cankd_jax.rehearse import collectives

    rng = np.random.default_rng(5)
    b, m, strides = 4, 24, (4, 8)
    feats = [jnp.asarray(rng.standard_normal((b, 64 // s, 96 // s, 8)), jnp.float32) for s in strides]
    xy = rng.uniform(0, 60, (b, m, 2))
    boxes = jnp.asarray(np.concatenate([xy, xy + rng.uniform(2, 60, (b, m, 2))], -1), jnp.float32)

    def rows(fs):
        return extract_roi_features(fs, batch_rois(boxes), strides, chunk=16)

    def per_image(fs):
        return extract_roi_features(fs, batch_rois(boxes).reshape(b, m, 5), strides, chunk=16).reshape(b * m, 7, 7, 8)

    # Not bit for bit: sorted per image, a RoI may land in a chunk of another tier, whose zero-weight samples
    # change the order of its float32 sums (as `tiered=False` does).
    np.testing.assert_allclose(per_image(feats), rows(feats), rtol=1e-5, atol=1e-5)
    cot = jnp.asarray(rng.standard_normal((b * m, 7, 7, 8)), jnp.float32)
    g_rows = jax.grad(lambda fs: jnp.sum(rows(fs) * cot))(feats)
    g_image = jax.grad(lambda fs: jnp.sum(per_image(fs) * cot))(feats)
    for a, c in zip(g_image, g_rows):
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-5)  # likewise, and scatter-adds in another order

    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:4]), ("data",))
    split = NamedSharding(mesh, P("data"))
    abstract = [jax.ShapeDtypeStruct(f.shape, f.dtype, sharding=split) for f in feats]

    def payload(fn):  # bytes the partitioned program's collectives carry
        text = jax.jit(fn, out_shardings=split).lower(abstract).compile().as_text()
        return sum(n * (8 if d.endswith("64") else 4) for c in collectives(text, 4) for d, n, _ in c["arrays"])

    # per image: only the chunks' shared grid tier (one int32 per chunk, a max over the images) crosses devices
    assert payload(per_image) <= 4 * (m // 16 + 1)
    assert payload(rows) >= sum(f.size * 4 for f in feats) * 3 // 4  # the rows form gathers the maps
