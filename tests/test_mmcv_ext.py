"""The stand-in for mmcv's compiled kernels (`mmcv_ext.py`) against literal transcriptions of mmcv 2.1's C++
(`mmcv/ops/csrc/pytorch/cpu/*.cpp`, shipped with mmcv-lite): the same loops, element by element, in float32."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

import mmcv_ext


def nms_cpu_transcribed(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, offset: int) -> torch.Tensor:
    """`nms_cpu` of mmcv/ops/csrc/pytorch/cpu/nms.cpp, statement by statement (float32 scalars throughout)."""
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.long)
    x1, y1, x2, y2 = (boxes.select(1, i).contiguous().numpy() for i in range(4))
    f = np.float32
    areas = (torch.from_numpy(x2) - torch.from_numpy(x1) + offset) * (torch.from_numpy(y2) - torch.from_numpy(y1)
                                                                      + offset)
    areas = areas.numpy()
    order_t = scores.sort(0, descending=True)[1]
    order = order_t.numpy()
    nboxes = boxes.size(0)
    select = np.ones(nboxes, bool)
    thr = f(iou_threshold)
    for _i in range(nboxes):
        if not select[_i]:
            continue
        i = order[_i]
        ix1, iy1, ix2, iy2, iarea = x1[i], y1[i], x2[i], y2[i], areas[i]
        for _j in range(_i + 1, nboxes):
            if not select[_j]:
                continue
            j = order[_j]
            xx1 = max(ix1, x1[j])
            yy1 = max(iy1, y1[j])
            xx2 = min(ix2, x2[j])
            yy2 = min(iy2, y2[j])
            w = max(f(0.0), f(xx2 - xx1 + f(offset)))
            h = max(f(0.0), f(yy2 - yy1 + f(offset)))
            inter = f(w * h)
            ovr = f(inter / f(iarea + areas[j] - inter))
            if ovr > thr:
                select[_j] = False
    return order_t.masked_select(torch.from_numpy(select))


def _boxes(n: int, seed: int, clustered: bool) -> tuple[torch.Tensor, torch.Tensor]:
    r = np.random.default_rng(seed)
    if clustered:  # few clusters of jittered boxes: many overlaps near every threshold
        centres = r.uniform(20, 200, (4, 2))[r.integers(0, 4, n)] + r.normal(0, 6, (n, 2))
    else:
        centres = r.uniform(0, 150, (n, 2))  # spread out, yet overlapping often
    wh = r.uniform(4, 60, (n, 2))
    boxes = np.concatenate([centres - wh / 2, centres + wh / 2], 1).astype(np.float32)
    scores = r.uniform(0, 1, n).astype(np.float32)
    if seed % 3 == 0:  # ties in the scores: the order is whatever the kernel's sort gives, on both sides
        scores[: n // 2] = scores[0]
    return torch.from_numpy(boxes), torch.from_numpy(scores)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("iou_threshold, offset", [(0.5, 0), (0.6, 0), (0.3, 1), (0.7, 1)])
def test_nms_matches_the_transcribed_kernel(seed, iou_threshold, offset):
    clustered = seed % 2 == 0
    boxes, scores = _boxes(120, seed, clustered=clustered)
    expected = nms_cpu_transcribed(boxes, scores, iou_threshold, offset)
    got = mmcv_ext.nms(boxes, scores, iou_threshold=iou_threshold, offset=offset)
    assert got.dtype == torch.long and 5 < len(expected) <= 120
    if clustered:  # overlapping boxes were suppressed: the inner loop acted
        assert len(expected) < 115
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_nms_empty_and_unported_kernels():
    assert mmcv_ext.nms(torch.zeros((0, 4)), torch.zeros((0,)), iou_threshold=0.5, offset=0).shape == (0,)
    with pytest.raises(NotImplementedError,
                       match="mmcv._ext.roi_align_rotated_forward: this mmcv CPU kernel has no port"):
        mmcv_ext.roi_align_rotated_forward(torch.zeros(1))


# RoIAlign: mmcv/ops/csrc/pytorch/cpu/roi_align.cpp ------------------------------------------------------------


def pre_calc_for_bilinear_interpolate(height, width, pooled_height, pooled_width, iy_upper, ix_upper, roi_start_h,
                                      roi_start_w, bin_size_h, bin_size_w, roi_bin_grid_h, roi_bin_grid_w):
    """`pre_calc_for_bilinear_interpolate<float>`, statement by statement: the PreCalc entries as tuples
    (pos1, pos2, pos3, pos4, w1, w2, w3, w4)."""
    f = np.float32
    pre_calc = []
    for ph in range(pooled_height):
        for pw in range(pooled_width):
            for iy in range(iy_upper):
                yy = roi_start_h + f(ph) * bin_size_h + f(iy + .5) * bin_size_h / f(roi_bin_grid_h)
                for ix in range(ix_upper):
                    xx = roi_start_w + f(pw) * bin_size_w + f(ix + .5) * bin_size_w / f(roi_bin_grid_w)
                    x = xx
                    y = yy
                    if y < -1.0 or y > height or x < -1.0 or x > width:
                        pre_calc.append((0, 0, 0, 0, f(0), f(0), f(0), f(0)))
                        continue
                    if y <= 0:
                        y = f(0)
                    if x <= 0:
                        x = f(0)
                    y_low = int(y)
                    x_low = int(x)
                    if y_low >= height - 1:
                        y_high = y_low = height - 1
                        y = f(y_low)
                    else:
                        y_high = y_low + 1
                    if x_low >= width - 1:
                        x_high = x_low = width - 1
                        x = f(x_low)
                    else:
                        x_high = x_low + 1
                    ly = y - f(y_low)
                    lx = x - f(x_low)
                    hy, hx = f(1. - np.float64(ly)), f(1. - np.float64(lx))  # `T hy = 1. - ly`: in double
                    w1, w2, w3, w4 = hy * hx, hy * lx, ly * hx, ly * lx
                    pre_calc.append((y_low * width + x_low, y_low * width + x_high, y_high * width + x_low,
                                     y_high * width + x_high, w1, w2, w3, w4))
    return pre_calc


def _roi_geometry_transcribed(offset_rois, spatial_scale, pooled_height, pooled_width, aligned, message):
    """The prologue both kernels share, for one RoI (float32 scalars)."""
    f = np.float32
    roi_batch_ind = int(offset_rois[0])
    offset = f(0.5) if aligned else f(0.0)
    roi_start_w = offset_rois[1] * spatial_scale - offset
    roi_start_h = offset_rois[2] * spatial_scale - offset
    roi_end_w = offset_rois[3] * spatial_scale - offset
    roi_end_h = offset_rois[4] * spatial_scale - offset
    roi_width = roi_end_w - roi_start_w
    roi_height = roi_end_h - roi_start_h
    if aligned:
        if not (roi_width >= 0 and roi_height >= 0):
            raise RuntimeError(message)
    else:
        roi_width = f(1.) if roi_width < f(1.) else roi_width  # std::max(roi_width, (T)1.)
        roi_height = f(1.) if roi_height < f(1.) else roi_height
    bin_size_h = roi_height / f(pooled_height)
    bin_size_w = roi_width / f(pooled_width)
    return roi_batch_ind, roi_start_h, roi_start_w, roi_height, roi_width, bin_size_h, bin_size_w


def roi_align_forward_transcribed(input, rois, pooled_height, pooled_width, spatial_scale, sampling_ratio,
                                  pool_mode, aligned):
    """`ROIAlignForward<float>` as `roi_align_forward_cpu` runs it, statement by statement, on flat arrays:
    (output, argmax_y, argmax_x) shaped (rois, channels, pooled_height, pooled_width) (the argmax arrays are
    written for max pooling only, zeros else)."""
    f = np.float32
    channels, height, width = input.shape[1:]
    shape = (rois.shape[0], channels, pooled_height, pooled_width)
    nthreads = int(np.prod(shape))
    input_, rois_ = input.numpy().ravel(), rois.numpy().ravel()
    output, argmax_y, argmax_x = np.zeros(nthreads, f), np.zeros(nthreads, f), np.zeros(nthreads, f)
    spatial_scale = f(spatial_scale)  # static_cast<scalar_t>(spatial_scale)
    n_rois = nthreads // channels // pooled_width // pooled_height
    for n in range(n_rois):
        index_n = n * channels * pooled_width * pooled_height
        offset_rois = rois_[n * 5:n * 5 + 5]
        roi_batch_ind, roi_start_h, roi_start_w, roi_height, roi_width, bin_size_h, bin_size_w = \
            _roi_geometry_transcribed(offset_rois, spatial_scale, pooled_height, pooled_width, aligned,
                                      "ROIs in ROIAlign cannot have non-negative size!")
        roi_bin_grid_h = sampling_ratio if sampling_ratio > 0 else int(np.ceil(roi_height / f(pooled_height)))
        roi_bin_grid_w = sampling_ratio if sampling_ratio > 0 else int(np.ceil(roi_width / f(pooled_width)))
        count = f(max(roi_bin_grid_h * roi_bin_grid_w, 1))
        pre_calc = pre_calc_for_bilinear_interpolate(
            height, width, pooled_height, pooled_width, roi_bin_grid_h, roi_bin_grid_w, roi_start_h, roi_start_w,
            bin_size_h, bin_size_w, roi_bin_grid_h, roi_bin_grid_w)
        for c in range(channels):
            index_n_c = index_n + c * pooled_width * pooled_height
            offset_input = (roi_batch_ind * channels + c) * height * width
            pre_calc_index = 0
            for ph in range(pooled_height):
                for pw in range(pooled_width):
                    index = index_n_c + ph * pooled_width + pw
                    output_val = f(0.)
                    maxval = f(-10000)
                    maxidx_y, maxidx_x = f(-1.), f(-1.)
                    for iy in range(roi_bin_grid_h):
                        y = roi_start_h + f(ph) * bin_size_h + f(iy + .5) * bin_size_h / f(roi_bin_grid_h)
                        for ix in range(roi_bin_grid_w):
                            x = roi_start_w + f(pw) * bin_size_w + f(ix + .5) * bin_size_w / f(roi_bin_grid_w)
                            pos1, pos2, pos3, pos4, w1, w2, w3, w4 = pre_calc[pre_calc_index]
                            val = (w1 * input_[offset_input + pos1] + w2 * input_[offset_input + pos2]
                                   + w3 * input_[offset_input + pos3] + w4 * input_[offset_input + pos4])
                            if val > maxval:
                                maxval = val
                                maxidx_y = y
                                maxidx_x = x
                            output_val += val
                            pre_calc_index += 1
                    if pool_mode == 0:
                        output[index] = maxval
                        argmax_y[index] = maxidx_y
                        argmax_x[index] = maxidx_x
                    elif pool_mode == 1:
                        output[index] = output_val / count
    return output.reshape(shape), argmax_y.reshape(shape), argmax_x.reshape(shape)


def bilinear_interpolate_gradient(height, width, y, x):
    """`bilinear_interpolate_gradient<float>`: (w1, w2, w3, w4, x_low, x_high, y_low, y_high)."""
    f = np.float32
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return f(0.), f(0.), f(0.), f(0.), -1, -1, -1, -1
    if y <= 0:
        y = f(0)
    if x <= 0:
        x = f(0)
    y_low = int(y)
    x_low = int(x)
    if y_low >= height - 1:
        y_high = y_low = height - 1
        y = f(y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_high = x_low = width - 1
        x = f(x_low)
    else:
        x_high = x_low + 1
    ly = y - f(y_low)
    lx = x - f(x_low)
    hy, hx = f(1. - np.float64(ly)), f(1. - np.float64(lx))
    w1, w2, w3, w4 = hy * hx, hy * lx, ly * hx, ly * lx
    return w1, w2, w3, w4, x_low, x_high, y_low, y_high


def roi_align_backward_transcribed(grad_output, rois, argmax_y, argmax_x, grad_input, pooled_height, pooled_width,
                                   spatial_scale, sampling_ratio, pool_mode, aligned):
    """`ROIAlignBackward<float>` as `roi_align_backward_cpu` runs it, statement by statement, on flat arrays
    (grad_output read through its strides): `grad_input` plus what the kernel adds to it, a new array."""
    f = np.float32
    channels, height, width = grad_input.shape[1:]
    nthreads = grad_output.numel()
    n_stride, c_stride, h_stride, w_stride = grad_output.stride()
    assert grad_output.is_contiguous()  # so that its flat array is its storage
    grad_output_, rois_ = grad_output.numpy().ravel(), rois.numpy().ravel()
    argmax_y, argmax_x = argmax_y.numpy().ravel(), argmax_x.numpy().ravel()
    grad_input_ = grad_input.numpy().ravel().copy()
    spatial_scale = f(spatial_scale)
    for index in range(nthreads):
        pw = index % pooled_width
        ph = (index // pooled_width) % pooled_height
        c = (index // pooled_width // pooled_height) % channels
        n = index // pooled_width // pooled_height // channels
        offset_rois = rois_[n * 5:n * 5 + 5]
        roi_batch_ind, roi_start_h, roi_start_w, roi_height, roi_width, bin_size_h, bin_size_w = \
            _roi_geometry_transcribed(offset_rois, spatial_scale, pooled_height, pooled_width, aligned,
                                      "ROIs in ROIAlign do not have non-negative size!")
        offset_grad_input = (roi_batch_ind * channels + c) * height * width
        output_offset = n * n_stride + c * c_stride
        grad_output_this_bin = grad_output_[output_offset + ph * h_stride + pw * w_stride]
        if pool_mode == 0:
            y, x = argmax_y[index], argmax_x[index]
            if y != f(-1.):
                w1, w2, w3, w4, x_low, x_high, y_low, y_high = bilinear_interpolate_gradient(height, width, y, x)
                g1 = grad_output_this_bin * w1
                g2 = grad_output_this_bin * w2
                g3 = grad_output_this_bin * w3
                g4 = grad_output_this_bin * w4
                if x_low >= 0 and x_high >= 0 and y_low >= 0 and y_high >= 0:
                    grad_input_[offset_grad_input + y_low * width + x_low] += g1
                    grad_input_[offset_grad_input + y_low * width + x_high] += g2
                    grad_input_[offset_grad_input + y_high * width + x_low] += g3
                    grad_input_[offset_grad_input + y_high * width + x_high] += g4
        elif pool_mode == 1:
            roi_bin_grid_h = sampling_ratio if sampling_ratio > 0 else int(np.ceil(roi_height / f(pooled_height)))
            roi_bin_grid_w = sampling_ratio if sampling_ratio > 0 else int(np.ceil(roi_width / f(pooled_width)))
            count = f(roi_bin_grid_h * roi_bin_grid_w)
            for iy in range(roi_bin_grid_h):
                y = roi_start_h + f(ph) * bin_size_h + f(iy + .5) * bin_size_h / f(roi_bin_grid_h)
                for ix in range(roi_bin_grid_w):
                    x = roi_start_w + f(pw) * bin_size_w + f(ix + .5) * bin_size_w / f(roi_bin_grid_w)
                    w1, w2, w3, w4, x_low, x_high, y_low, y_high = bilinear_interpolate_gradient(height, width, y, x)
                    g1 = grad_output_this_bin * w1 / count
                    g2 = grad_output_this_bin * w2 / count
                    g3 = grad_output_this_bin * w3 / count
                    g4 = grad_output_this_bin * w4 / count
                    if x_low >= 0 and x_high >= 0 and y_low >= 0 and y_high >= 0:
                        grad_input_[offset_grad_input + y_low * width + x_low] += g1
                        grad_input_[offset_grad_input + y_low * width + x_high] += g2
                        grad_input_[offset_grad_input + y_high * width + x_low] += g3
                        grad_input_[offset_grad_input + y_high * width + x_high] += g4
    return grad_input_.reshape(grad_input.shape)


_MAP = (2, 3, 13, 17)  # (batch, channels, height, width) of the feature map


def _roi_align_case(seed: int, spatial_scale: float, aligned: bool, pooled: tuple[int, int]):
    """A feature map and RoIs (image coordinates, `1 / spatial_scale` image pixels a map pixel) that reach every
    branch of the kernels: RoIs inside, partly off each side (samples with y < -1, in -1 <= y <= 0 and past the
    last row / column), larger than the map, wholly outside, under a map pixel and under an image pixel, of zero
    size (an empty grid when aligned and sampling_ratio is 0), with samples exactly on x = -1 and y = height
    (2 map pixels a bin: for sampling_ratio 0 or 2, a sample every pixel), and, where not aligned, of negative
    size (raised to 1); on both images, overlapping (so the backward's additions meet). Channel 0 is negative
    throughout, so that in it samples off the map (val 0) are the maxima, tied."""
    r = np.random.default_rng(seed)
    u = r.uniform
    features = r.normal(0, 1, _MAP).astype(np.float32)
    features[:, 0] = -np.abs(features[:, 0]) - 0.25
    s = 1 / spatial_scale
    hi, wi = _MAP[2] * s, _MAP[3] * s
    boxes = [  # x1, y1, x2, y2
        (x := u(0, wi / 2), y := u(0, hi / 2), x + u(s, wi / 2), y + u(s, hi / 2)),  # inside
        (x := u(-3 * s, -s / 2), y := u(-3 * s, -s / 2), x + u(3 * s, wi / 2), y + u(3 * s, hi / 2)),  # off top left
        (x := u(wi / 2, 0.9 * wi), y := u(hi / 2, 0.9 * hi), x + u(wi / 3, wi / 2), y + u(hi / 3, hi / 2)),
        (u(-2 * s, -s / 5), u(-2 * s, -s / 5), wi + u(s / 5, 2 * s), hi + u(s / 5, 2 * s)),  # around the map
        (x := wi + u(2 * s, 4 * s), y := u(0, hi), x + u(s, 3 * s), y + u(s, 3 * s)),  # wholly outside
        (x := u(0, wi - s), y := u(0, hi - s), x + u(0.05, 0.9) * s, y + u(0.05, 0.9) * s),  # < a map pixel
        (x := u(0, wi - 1), y := u(0, hi - 1), x + u(0.05, 0.9), y + u(0.05, 0.9)),  # < an image pixel
        (x := u(0, wi), y := u(0, hi), x, y),  # zero size
        # samples at x = -1, 0, 1, ... and y = ..., height - 1, height
        (x := (-1 if aligned else -1.5) * s, y := (_MAP[2] + (1 if aligned else 0.5) - 2 * pooled[0]) * s,
         x + 2 * pooled[1] * s, y + 2 * pooled[0] * s),
    ]
    if not aligned:
        boxes.append((x := u(s, wi), y := u(s, hi), x - u(0.1, 2) * s, y - u(0.1, 2) * s))  # negative size
    batch = r.integers(0, 2, len(boxes))
    batch[:2] = (0, 1)
    rois = np.concatenate([batch[:, None], np.asarray(boxes)], 1).astype(np.float32)
    return torch.from_numpy(features), torch.from_numpy(rois)


_ROI_ALIGN_SETTINGS = [(1 / 4, (3, 2)), (1 / 8, (3, 2)), (1 / 4, (7, 7)), (1 / 8, (7, 7))]  # by seed


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
@pytest.mark.parametrize("pool_mode", [0, 1])
@pytest.mark.parametrize("seed", range(4))
def test_roi_align_matches_the_transcribed_kernels(seed, pool_mode, sampling_ratio, aligned, monkeypatch):
    """Forward and backward bit for bit (the port does the kernel's float32 operations in the kernel's order,
    the backward's additions into grad_input included). Odd seeds shrink the port's chunks to a few RoIs each,
    so that RoIs of different grids share a chunk (padding) and the additions span chunks; even seeds start
    grad_input from non-zero values (the kernel adds into it)."""
    spatial_scale, (pooled_height, pooled_width) = _ROI_ALIGN_SETTINGS[seed]
    if seed % 2:
        monkeypatch.setattr(mmcv_ext, "_ROI_ALIGN_CHUNK", 2000)
    features, rois = _roi_align_case(seed, spatial_scale, aligned, (pooled_height, pooled_width))
    args = (pooled_height, pooled_width, spatial_scale, sampling_ratio, pool_mode, aligned)
    expected, expected_y, expected_x = roi_align_forward_transcribed(features, rois, *args)

    shape = (rois.size(0), features.size(1), pooled_height, pooled_width)
    output = torch.zeros(shape)
    argmax_y, argmax_x = (torch.zeros(shape), torch.zeros(shape)) if pool_mode == 0 else (torch.zeros(0),) * 2
    # positional, in the pybind order (mmcv passes the scalars by name: test_roi_align_through_mmcv_ops)
    assert mmcv_ext.roi_align_forward(features, rois, output, argmax_y, argmax_x, *args) is None
    torch.testing.assert_close(output, torch.from_numpy(expected), rtol=0, atol=0)
    if pool_mode == 0:
        torch.testing.assert_close(argmax_y, torch.from_numpy(expected_y), rtol=0, atol=0)
        torch.testing.assert_close(argmax_x, torch.from_numpy(expected_x), rtol=0, atol=0)
        off_map = (expected_y < -1) | (expected_y > _MAP[2]) | (expected_x < -1) | (expected_x > _MAP[3])
        assert off_map.any()  # the case reaches the samples off the map (and their ties, in channel 0)
        assert (expected == -10000).any() == (aligned and sampling_ratio == 0)  # an empty grid's bins
    else:
        assert (expected != 0).mean() > 0.5

    r = np.random.default_rng(seed + 100)
    grad_output = torch.from_numpy(r.normal(0, 1, shape).astype(np.float32))
    grad_input = torch.from_numpy(r.normal(0, 1, _MAP).astype(np.float32) if seed % 2 == 0
                                  else np.zeros(_MAP, np.float32))
    if pool_mode == 0:
        argmax_y, argmax_x = torch.from_numpy(expected_y), torch.from_numpy(expected_x)
    expected_grad = roi_align_backward_transcribed(grad_output, rois, argmax_y, argmax_x, grad_input, *args)
    assert not np.array_equal(expected_grad, grad_input.numpy())
    assert mmcv_ext.roi_align_backward(grad_output, rois, argmax_y, argmax_x, grad_input, *args) is None
    torch.testing.assert_close(grad_input, torch.from_numpy(expected_grad), rtol=0, atol=0)


def test_roi_align_rejects_negative_sizes_when_aligned():
    features = torch.zeros(_MAP)
    rois = torch.tensor([[0, 4.0, 4.0, 20.0, 20.0], [1, 8.0, 4.0, 7.0, 20.0]])
    output = torch.zeros(2, _MAP[1], 2, 2)
    with pytest.raises(RuntimeError, match="ROIs in ROIAlign cannot have non-negative size!"):
        mmcv_ext.roi_align_forward(features, rois, output, torch.zeros(0), torch.zeros(0), 2, 2, 0.25, 0, 1, True)
    with pytest.raises(RuntimeError, match="ROIs in ROIAlign do not have non-negative size!"):
        mmcv_ext.roi_align_backward(output, rois, torch.zeros(0), torch.zeros(0), features, 2, 2, 0.25, 0, 1, True)
    with pytest.raises(RuntimeError, match="ROIs in ROIAlign cannot have non-negative size!"):
        roi_align_forward_transcribed(features, rois, 2, 2, 0.25, 0, 1, True)


@pytest.mark.parametrize("pool_mode", ["avg", "max"])
def test_roi_align_through_mmcv_ops(pool_mode):
    """mmcv's own `RoIAlign` (max) / `roi_align` (avg), forward and autograd backward, on this stand-in: the
    arguments reach the port as mmcv passes them (keywords, in-place outputs, argmax saved for the backward)."""
    mmcv_ext.install()
    ops = pytest.importorskip("mmcv.ops")
    assert sys.modules["mmcv._ext"] is mmcv_ext and sys.modules["mmcv.ops.roi_align"].ext_module is mmcv_ext
    spatial_scale, output_size, sampling_ratio = 1 / 8, (3, 2), 0
    features, rois = _roi_align_case(5, spatial_scale, True, output_size)
    features.requires_grad_(True)
    if pool_mode == "max":
        output = ops.RoIAlign(output_size, spatial_scale, sampling_ratio, "max", aligned=True)(features, rois)
    else:
        output = ops.roi_align(features, rois, output_size, spatial_scale, sampling_ratio, "avg", True)
    mode = 0 if pool_mode == "max" else 1
    args = (*output_size, spatial_scale, sampling_ratio, mode, True)
    expected, expected_y, expected_x = roi_align_forward_transcribed(features.detach(), rois, *args)
    torch.testing.assert_close(output.detach(), torch.from_numpy(expected), rtol=0, atol=0)

    grad_output = torch.from_numpy(np.random.default_rng(6).normal(0, 1, output.shape).astype(np.float32))
    output.backward(grad_output)
    argmax = (torch.from_numpy(expected_y), torch.from_numpy(expected_x)) if mode == 0 else (torch.zeros(0),) * 2
    expected_grad = roi_align_backward_transcribed(grad_output, rois, *argmax, torch.zeros(_MAP), *args)
    assert np.abs(expected_grad).sum() > 0
    torch.testing.assert_close(features.grad, torch.from_numpy(expected_grad), rtol=0, atol=0)


# Deformable convolution (deform_conv.cpp, modulated_deform_conv.cpp) --------------------------------------------
# One transcription serves both files: the modulated kernels are the plain ones with `* mask` where noted.

F32 = np.float32


def _bilinear_transcribed(im, height, width, h, w):
    """`deformable_im2col_bilinear_cpu` / `dmcn_im2col_bilinear_cpu`; `im` a 2-D float32 array."""
    if h <= -1 or height <= h or w <= -1 or width <= w:
        return F32(0)
    h_low, w_low = int(np.floor(h)), int(np.floor(w))
    h_high, w_high = h_low + 1, w_low + 1
    lh, lw = F32(h - F32(h_low)), F32(w - F32(w_low))
    hh, hw = F32(F32(1) - lh), F32(F32(1) - lw)
    v1 = im[h_low, w_low] if h_low >= 0 and w_low >= 0 else F32(0)
    v2 = im[h_low, w_high] if h_low >= 0 and w_high <= width - 1 else F32(0)
    v3 = im[h_high, w_low] if h_high <= height - 1 and w_low >= 0 else F32(0)
    v4 = im[h_high, w_high] if h_high <= height - 1 and w_high <= width - 1 else F32(0)
    w1, w2, w3, w4 = hh * hw, hh * lw, lh * hw, lh * lw
    return F32(w1 * v1 + w2 * v2 + w3 * v3 + w4 * v4)


def _gradient_weight_transcribed(argmax_h, argmax_w, h, w, height, width):
    if argmax_h <= -1 or argmax_h >= height or argmax_w <= -1 or argmax_w >= width:
        return F32(0)
    h_low, w_low = int(np.floor(argmax_h)), int(np.floor(argmax_w))
    h_high, w_high = h_low + 1, w_low + 1
    weight = F32(0)
    if h == h_low and w == w_low:
        weight = (F32(h + 1) - argmax_h) * (F32(w + 1) - argmax_w)
    if h == h_low and w == w_high:
        weight = (F32(h + 1) - argmax_h) * (argmax_w + F32(1) - F32(w))
    if h == h_high and w == w_low:
        weight = (argmax_h + F32(1) - F32(h)) * (F32(w + 1) - argmax_w)
    if h == h_high and w == w_high:
        weight = (argmax_h + F32(1) - F32(h)) * (argmax_w + F32(1) - F32(w))
    return F32(weight)


def _coordinate_weight_transcribed(argmax_h, argmax_w, height, width, im, bp_dir):
    if argmax_h <= -1 or argmax_h >= height or argmax_w <= -1 or argmax_w >= width:
        return F32(0)
    h_low, w_low = int(np.floor(argmax_h)), int(np.floor(argmax_w))
    h_high, w_high = h_low + 1, w_low + 1
    weight = F32(0)
    if bp_dir == 0:
        if h_low >= 0 and w_low >= 0:
            weight += F32(-1) * (F32(w_low + 1) - argmax_w) * im[h_low, w_low]
        if h_low >= 0 and w_high <= width - 1:
            weight += F32(-1) * (argmax_w - F32(w_low)) * im[h_low, w_high]
        if h_high <= height - 1 and w_low >= 0:
            weight += (F32(w_low + 1) - argmax_w) * im[h_high, w_low]
        if h_high <= height - 1 and w_high <= width - 1:
            weight += (argmax_w - F32(w_low)) * im[h_high, w_high]
    else:
        if h_low >= 0 and w_low >= 0:
            weight += F32(-1) * (F32(h_low + 1) - argmax_h) * im[h_low, w_low]
        if h_low >= 0 and w_high <= width - 1:
            weight += (F32(h_low + 1) - argmax_h) * im[h_low, w_high]
        if h_high <= height - 1 and w_low >= 0:
            weight += F32(-1) * (argmax_h - F32(h_low)) * im[h_high, w_low]
        if h_high <= height - 1 and w_high <= width - 1:
            weight += (argmax_h - F32(h_low)) * im[h_high, w_high]
    return F32(weight)


def deformable_im2col_transcribed(im, offset, mask, kh, kw, pad, stride, dil, dg):
    """`deformable_im2col_cpu_kernel` (mask None) / `modulated_deformable_im2col_cpu_kernel`: (C*K, n*Ho*Wo)."""
    n, c, height, width = im.shape
    _, _, hc, wc = offset.shape
    col = np.zeros((c * kh * kw, n * hc * wc), F32)
    cpg = c // dg
    for index in range(c * hc * wc * n):
        w_col = index % wc
        h_col = (index // wc) % hc
        b_col = (index // wc // hc) % n
        c_im = (index // wc // hc) // n
        c_col = c_im * kh * kw
        g = c_im // cpg
        h_in, w_in = h_col * stride - pad, w_col * stride - pad
        for i in range(kh):
            for j in range(kw):
                off_h = offset[b_col, g * 2 * kh * kw + 2 * (i * kw + j), h_col, w_col]
                off_w = offset[b_col, g * 2 * kh * kw + 2 * (i * kw + j) + 1, h_col, w_col]
                val = F32(0)
                h_im, w_im = F32(h_in + i * dil) + off_h, F32(w_in + j * dil) + off_w
                if h_im > -1 and w_im > -1 and h_im < height and w_im < width:
                    val = _bilinear_transcribed(im[b_col, c_im], height, width, h_im, w_im)
                if mask is not None:
                    val = F32(val * mask[b_col, g * kh * kw + i * kw + j, h_col, w_col])
                col[c_col + i * kw + j, (b_col * hc + h_col) * wc + w_col] = val
    return col


def deformable_col2im_transcribed(col, offset, mask, shape, kh, kw, pad, stride, dil, dg):
    """`deformable_col2im_cpu_kernel` / the modulated one: the input gradient of `shape` (n, C, H, W)."""
    n, c, height, width = shape
    _, _, hc, wc = offset.shape
    grad = np.zeros(shape, F32)
    cpg = c // dg
    for index in range(c * kh * kw * hc * wc * n):
        j = (index // wc // hc // n) % kw
        i = (index // wc // hc // n // kw) % kh
        ch = index // wc // hc // n // kw // kh
        g = ch // cpg
        w_out, h_out, b = index % wc, (index // wc) % hc, (index // wc // hc) % n
        w_in, h_in = w_out * stride - pad, h_out * stride - pad
        off_h = offset[b, g * 2 * kh * kw + 2 * (i * kw + j), h_out, w_out]
        off_w = offset[b, g * 2 * kh * kw + 2 * (i * kw + j) + 1, h_out, w_out]
        inv_h, inv_w = F32(h_in + i * dil) + off_h, F32(w_in + j * dil) + off_w
        top = col[index // (n * hc * wc), index % (n * hc * wc)]
        if mask is not None:
            top = F32(top * mask[b, g * kh * kw + i * kw + j, h_out, w_out])
        cur_h, cur_w = int(inv_h), int(inv_w)
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                if (0 <= cur_h + dy < height and 0 <= cur_w + dx < width and abs(inv_h - F32(cur_h + dy)) < 1
                        and abs(inv_w - F32(cur_w + dx)) < 1):
                    weight = _gradient_weight_transcribed(inv_h, inv_w, cur_h + dy, cur_w + dx, height, width)
                    grad[b, ch, cur_h + dy, cur_w + dx] += F32(weight * top)
    return grad


def deformable_col2im_coord_transcribed(col, im, offset, mask, kh, kw, pad, stride, dil, dg):
    """`deformable_col2im_coord_cpu_kernel` / the modulated one: (grad_offset, grad_mask or None)."""
    n, c, height, width = im.shape
    _, _, hc, wc = offset.shape
    offset_channels = 2 * kh * kw * dg
    grad_offset = np.zeros(offset.shape, F32)
    grad_mask = None if mask is None else np.zeros((n, dg * kh * kw, hc, wc), F32)
    cpg_col = c * kh * kw // dg
    flat_col = col.reshape(-1)
    for index in range(hc * wc * offset_channels * n):
        val, mval = F32(0), F32(0)
        w, h = index % wc, (index // wc) % hc
        ch = (index // wc // hc) % offset_channels
        b = (index // wc // hc) // offset_channels
        g = ch // (2 * kh * kw)
        col_base = g * cpg_col * n * wc * hc
        offset_c = ch - g * 2 * kh * kw
        cnt = 0
        for col_c in range(offset_c // 2, cpg_col, kh * kw):
            col_pos = ((col_c * n + b) * hc + h) * wc + w
            bp_dir = offset_c % 2
            j = (col_pos // wc // hc // n) % kw
            i = (col_pos // wc // hc // n // kw) % kh
            w_out, h_out = col_pos % wc, (col_pos // wc) % hc
            w_in, h_in = w_out * stride - pad, h_out * stride - pad
            off_h = offset[b, g * 2 * kh * kw + 2 * (i * kw + j), h_out, w_out]
            off_w = offset[b, g * 2 * kh * kw + 2 * (i * kw + j) + 1, h_out, w_out]
            inv_h, inv_w = F32(h_in + i * dil) + off_h, F32(w_in + j * dil) + off_w
            image = im[b, g * (c // dg) + cnt]
            value = flat_col[col_base + col_pos]
            if inv_h <= -1 or inv_w <= -1 or inv_h >= height or inv_w >= width:
                inv_h = inv_w = F32(-2)
            elif mask is not None:
                mval += F32(value * _bilinear_transcribed(image, height, width, inv_h, inv_w))
            weight = _coordinate_weight_transcribed(inv_h, inv_w, height, width, image, bp_dir)
            m = F32(1) if mask is None else mask[b, g * kh * kw + i * kw + j, h_out, w_out]
            val += F32(F32(weight * value) * m)
            cnt += 1
        grad_offset[b, ch, h, w] = val
        if mask is not None and offset_c % 2 == 0:
            grad_mask[b, g * kh * kw + offset_c // 2, h, w] = mval
    return grad_offset, grad_mask


def _deform_case(seed, n, c, size, k, pad, stride, dil, dg, modulated, integer_offsets=False):
    rng = np.random.default_rng(seed)
    ho = (size + 2 * pad - (dil * (k - 1) + 1)) // stride + 1
    im = rng.normal(0, 1, (n, c, size, size)).astype(F32)
    # offsets up to +-3 pixels: points inside, across the border and outside; integers put points exactly on
    # pixels and on -1 / H (the kernels' boundary cases)
    offset = rng.uniform(-3, 3, (n, dg * 2 * k * k, ho, ho)).astype(F32)
    if integer_offsets:
        offset = np.round(offset).astype(F32)
    mask = rng.uniform(0, 1, (n, dg * k * k, ho, ho)).astype(F32) if modulated else None
    col = rng.normal(0, 1, (c * k * k, n * ho * ho)).astype(F32)
    return im, offset, mask, col


@pytest.mark.parametrize("modulated", [False, True])
@pytest.mark.parametrize("seed, n, c, size, k, pad, stride, dil, dg, integer", [
    (0, 2, 2, 5, 3, 1, 1, 1, 1, False),
    (1, 1, 4, 6, 3, 2, 2, 2, 2, False),
    (2, 2, 2, 4, 3, 1, 1, 1, 2, True),
    (3, 1, 3, 5, 1, 0, 1, 1, 1, False),
])
def test_deform_conv_kernels_match_the_transcribed_kernels(seed, n, c, size, k, pad, stride, dil, dg, integer,
                                                           modulated):
    im, offset, mask, col = _deform_case(seed, n, c, size, k, pad, stride, dil, dg, modulated, integer)
    geometry = (k, k, pad, pad, stride, stride, dil, dil, dg)
    t = torch.from_numpy
    tm = None if mask is None else t(mask)
    expected = deformable_im2col_transcribed(im, offset, mask, k, k, pad, stride, dil, dg)
    assert np.abs(expected).sum() > 0
    np.testing.assert_array_equal(mmcv_ext._im2col(t(im), t(offset), tm, *geometry).numpy(), expected)

    grad = torch.zeros(im.shape)
    mmcv_ext._col2im(t(col), t(offset), tm, grad, *geometry)
    expected = deformable_col2im_transcribed(col, offset, mask, im.shape, k, k, pad, stride, dil, dg)
    assert np.abs(expected).sum() > 0
    # the kernel adds into a pixel in loop order; the port in (neighbour, element) order: float32 rounding apart
    np.testing.assert_allclose(grad.numpy(), expected, rtol=1e-5, atol=1e-6)

    d_offset, d_mask = mmcv_ext._col2im_coord(t(col), t(im), t(offset), tm, *geometry)
    e_offset, e_mask = deformable_col2im_coord_transcribed(col, im, offset, mask, k, k, pad, stride, dil, dg)
    assert np.abs(e_offset).sum() > 0
    np.testing.assert_array_equal(d_offset.numpy(), e_offset)
    if modulated:
        np.testing.assert_array_equal(d_mask.numpy(), e_mask)
