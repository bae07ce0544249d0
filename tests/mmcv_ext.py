"""A stand-in for `mmcv._ext`, the compiled kernels that mmcv-lite leaves out, so mmdetection 3.3 imports and runs
on the CPU as the tests' reference.

Each function here is a PyTorch port of mmcv 2.1's CPU kernel (mmcv-lite ships the C++ sources under
`mmcv/ops/csrc/pytorch/cpu/`), written to follow it operation by operation, and is itself checked against a
literal per-element transcription of that C++ (`tests/test_mmcv_ext.py`). Kernels not ported yet raise
`NotImplementedError` naming themselves when called; they exist as attributes because mmcv's op modules check
at import time that every kernel they use is present (`mmcv.utils.ext_loader.load_ext`).

Like the compiled kernels, the functions take mmcv's arguments in mmcv's order (positional or by the pybind names
mmcv's callers use) and, where the kernel writes into tensors it is given (`roi_align_*`), write into them in place
and return None.

`install()` registers this module as `mmcv._ext`; call it before mmcv.ops or mmdet is imported.
"""

from __future__ import annotations

import sys

import torch

PORTED = ("nms", "roi_align_forward", "roi_align_backward", "deform_conv_forward", "deform_conv_backward_input",
          "deform_conv_backward_parameters", "modulated_deform_conv_forward", "modulated_deform_conv_backward")


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, offset: int) -> torch.Tensor:
    """`nms_cpu` (mmcv/ops/csrc/pytorch/cpu/nms.cpp): indices of the kept boxes, highest score first.

    As the kernel: areas `(x2 - x1 + offset) * (y2 - y1 + offset)`; the order from `scores.sort(0, descending)`;
    walking that order, each still-selected box deselects every later selected box whose overlap
    `inter / (area_i + area_j - inter)` exceeds `iou_threshold` (float32 arithmetic throughout). The inner
    loop over later boxes is done for all of them at once, which gives the same result: a box's own
    selection is only read before any later box is visited, and a deselected box deselects nothing.
    """
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.long)
    x1, y1, x2, y2 = (boxes.select(1, i).contiguous() for i in range(4))
    areas = (x2 - x1 + offset) * (y2 - y1 + offset)
    order = scores.sort(0, descending=True)[1]
    n = boxes.size(0)
    select = torch.ones(n, dtype=torch.bool)
    for _i in range(n):
        if not select[_i]:
            continue
        i = order[_i]
        j = order[_i + 1:]
        xx1 = torch.maximum(x1[i], x1[j])
        yy1 = torch.maximum(y1[i], y1[j])
        xx2 = torch.minimum(x2[i], x2[j])
        yy2 = torch.minimum(y2[i], y2[j])
        w = torch.clamp(xx2 - xx1 + offset, min=0.0)
        h = torch.clamp(yy2 - yy1 + offset, min=0.0)
        inter = w * h
        ovr = inter / (areas[i] + areas[j] - inter)
        select[_i + 1:] &= ~(ovr > iou_threshold)
    return order.masked_select(select)


# RoIAlign (mmcv/ops/csrc/pytorch/cpu/roi_align.cpp) ------------------------------------------------------------

# Elements of the (rois, channels, bins, samples) working tensors per chunk of RoIs: bounds the memory the
# vectorised ports take (a few bytes x 60 per element) whatever the number and size of the RoIs.
_ROI_ALIGN_CHUNK = 1 << 21


def _roi_align_geometry(rois: torch.Tensor, dtype: torch.dtype, pooled_height: int, pooled_width: int,
                        spatial_scale: float, sampling_ratio: int, aligned: bool, message: str):
    """The kernels' per-RoI prologue, for all RoIs at once, in `T` = `dtype`: (roi_batch_ind, roi_start_h,
    roi_start_w, bin_size_h, bin_size_w, roi_bin_grid_h, roi_bin_grid_w), the last two as Python ints."""
    rois = rois.reshape(-1, 5).to(dtype)
    # pybind hands the kernel a C++ float, which the launcher casts to T
    scale = torch.tensor(spatial_scale, dtype=torch.float32).to(dtype)
    offset = torch.tensor(0.5 if aligned else 0.0, dtype=dtype)
    roi_batch_ind = rois[:, 0].to(torch.int64)  # `int roi_batch_ind = offset_rois[0]` truncates
    roi_start_w = rois[:, 1] * scale - offset
    roi_start_h = rois[:, 2] * scale - offset
    roi_end_w = rois[:, 3] * scale - offset
    roi_end_h = rois[:, 4] * scale - offset
    roi_width = roi_end_w - roi_start_w
    roi_height = roi_end_h - roi_start_h
    if aligned:
        if not bool(((roi_width >= 0) & (roi_height >= 0)).all()):
            raise RuntimeError(message)
    else:  # std::max(roi_width, (T)1.)
        roi_width = torch.where(roi_width < 1, torch.ones_like(roi_width), roi_width)
        roi_height = torch.where(roi_height < 1, torch.ones_like(roi_height), roi_height)
    bin_size_h = roi_height / torch.tensor(pooled_height, dtype=dtype)
    bin_size_w = roi_width / torch.tensor(pooled_width, dtype=dtype)
    if sampling_ratio > 0:
        grid_h = [sampling_ratio] * rois.size(0)
        grid_w = list(grid_h)
    else:  # ceilf(roi_height / pooled_height): ceilf takes a float (a narrowing when T is double)
        grid_h = torch.ceil((roi_height / torch.tensor(pooled_height, dtype=dtype)).float()).to(torch.int64).tolist()
        grid_w = torch.ceil((roi_width / torch.tensor(pooled_width, dtype=dtype)).float()).to(torch.int64).tolist()
    return roi_batch_ind, roi_start_h, roi_start_w, bin_size_h, bin_size_w, grid_h, grid_w


def _roi_align_chunks(grid_h: list[int], grid_w: list[int], per_sample: int):
    """Consecutive RoI ranges [start, stop) whose samples, padded to the range's largest grid, stay within
    `_ROI_ALIGN_CHUNK` elements of `per_sample` each (a range holds one RoI at least)."""
    start, most_h, most_w = 0, 0, 0
    for i, (h, w) in enumerate(zip(grid_h, grid_w)):
        h, w = max(most_h, h), max(most_w, w)
        if i > start and (i + 1 - start) * max(h * w, 1) * per_sample > _ROI_ALIGN_CHUNK:
            yield start, i
            start, h, w = i, grid_h[i], grid_w[i]
        most_h, most_w = h, w
    if start < len(grid_h):
        yield start, len(grid_h)


def _roi_align_samples(start: torch.Tensor, bin_size: torch.Tensor, grid: torch.Tensor, pooled: int, upper: int):
    """The sample coordinates `roi_start + p * bin_size + static_cast<T>(i + .5f) * bin_size / static_cast<T>(grid)`,
    shape (rois, pooled, upper) for p < pooled, i < upper (padded: i >= grid[roi] is not a sample of that RoI)."""
    dtype = bin_size.dtype
    p = torch.arange(pooled, dtype=dtype)[None, :, None]
    i = (torch.arange(upper, dtype=dtype) + 0.5)[None, None, :]
    start, bin_size, grid = start[:, None, None], bin_size[:, None, None], grid.to(dtype)[:, None, None]
    return (start + p * bin_size) + (i * bin_size) / grid


def _bilinear_axis(y: torch.Tensor, size: int):
    """One coordinate's part of `pre_calc_for_bilinear_interpolate` / `bilinear_interpolate_gradient`:
    (outside, low, high, l, h) with outside `y < -1.0 || y > size` (and NaN, where the kernel's `(int)y` would
    be undefined; only the padding samples of an empty grid give one here, and those are dropped), else y <= 0
    taken as 0, low = (int)y, high = low + 1 or, from low >= size - 1 on, low = high = size - 1 with y = low;
    l = y - low, h = 1. - l (the kernel's `1. - l` is a double subtraction rounded to T: the same as T's own,
    double having more than twice T's digits)."""
    outside = ~((y >= -1.0) & (y <= size))
    y = torch.where(y <= 0, torch.zeros_like(y), y)
    y = torch.where(outside, torch.zeros_like(y), y)  # only so that the conversion below is defined: dropped
    low = y.to(torch.int64)
    last = low >= size - 1
    low = torch.where(last, torch.full_like(low, size - 1), low)
    high = torch.where(last, low, low + 1)
    y = torch.where(last, low.to(y.dtype), y)
    ly = y - low.to(y.dtype)
    hy = 1 - ly
    return outside, low, high, ly, hy


def _bilinear(y_axis, x_axis, width: int, y_index, x_index):
    """Both coordinates' parts combined as the kernels do: (outside, (pos1..pos4), (w1..w4)), pos_k the offsets
    y_low * width + x_low, y_low * width + x_high, y_high * width + x_low, y_high * width + x_high and
    w1 = hy * hx, w2 = hy * lx, w3 = ly * hx, w4 = ly * lx; `y_index` / `x_index` place each axis's dimensions."""
    oy, ylo, yhi, ly, hy = (a[y_index] for a in y_axis)
    ox, xlo, xhi, lx, hx = (a[x_index] for a in x_axis)
    pos = (ylo * width + xlo, ylo * width + xhi, yhi * width + xlo, yhi * width + xhi)
    return oy | ox, pos, (hy * hx, hy * lx, ly * hx, ly * lx)


def roi_align_forward(input: torch.Tensor, rois: torch.Tensor, output: torch.Tensor, argmax_y: torch.Tensor,
                      argmax_x: torch.Tensor, aligned_height: int, aligned_width: int, spatial_scale: float,
                      sampling_ratio: int, pool_mode: int, aligned: bool) -> None:
    """`roi_align_forward_cpu` (`ROIAlignForward`, mmcv/ops/csrc/pytorch/cpu/roi_align.cpp), into `output` and, for
    max pooling (`pool_mode` 0), `argmax_y` / `argmax_x`, in place; `pool_mode` 1 averages.

    As the kernel, in `input`'s dtype (float32 in mmcv's use): per RoI `(batch, x1, y1, x2, y2)`, roi_start / end
    `coordinate * spatial_scale - offset` (offset 0.5 when `aligned`, which requires a size >= 0, else the size
    is raised to 1 at least), bin_size `size / pooled`, a grid of `sampling_ratio` or `ceilf(size / pooled)`
    samples per bin in each direction; per sample the weights of `pre_calc_for_bilinear_interpolate` (a sample
    with y < -1 or y > height, or x likewise, weighs 0 at offset 0; y <= 0 is read as 0; y_low >= height - 1
    clamps to the last row; columns alike) and `val = w1 * v1 + w2 * v2 + w3 * v3 + w4 * v4` summed left to
    right; per bin the samples' vals in the kernel's order (iy, then ix), summed one after the other into
    `output_val` (0. first) and divided by `count = max(grid_h * grid_w, 1)`, or the first largest val above
    maxval's -10000 kept with its sample's unclamped (y, x) (-1 when none). Vectorised over RoIs (in chunks of
    consecutive RoIs, each RoI's grid padded to the chunk's largest and the padding masked out), bins, samples
    and channels (channel-last, a pixel's channels one row, as the weights and offsets are the channels'
    alike); the loop over the samples stays, as the kernel's sum and running max are sequential.
    """
    channels, height, width = input.size(1), input.size(2), input.size(3)
    pooled = channels * aligned_height * aligned_width
    n_rois = output.numel() // pooled if pooled else 0
    if n_rois == 0 or pool_mode not in (0, 1):  # the kernel writes nothing for another pool_mode
        return None
    dtype = input.dtype
    batch, start_h, start_w, bin_h, bin_w, grid_h, grid_w = _roi_align_geometry(
        rois[:n_rois], dtype, aligned_height, aligned_width, spatial_scale, sampling_ratio, aligned,
        "ROIs in ROIAlign cannot have non-negative size!")
    pixels = input.permute(0, 2, 3, 1).reshape(-1, channels)  # (batch * height * width, channels)
    out = output.view(n_rois, channels, aligned_height, aligned_width)
    if pool_mode == 0:
        out_y = argmax_y.view(n_rois, channels, aligned_height, aligned_width)
        out_x = argmax_x.view(n_rois, channels, aligned_height, aligned_width)
    grid_h_t, grid_w_t = torch.tensor(grid_h, dtype=torch.int64), torch.tensor(grid_w, dtype=torch.int64)
    for a, b in _roi_align_chunks(grid_h, grid_w, pooled):
        upper_h, upper_w = max(grid_h[a:b]), max(grid_w[a:b])
        gh, gw = grid_h_t[a:b], grid_w_t[a:b]
        y = _roi_align_samples(start_h[a:b], bin_h[a:b], gh, aligned_height, upper_h)  # (n, ph, iy)
        x = _roi_align_samples(start_w[a:b], bin_w[a:b], gw, aligned_width, upper_w)  # (n, pw, ix)
        # (n, ph, pw, iy, ix), as pre_calc holds them
        outside, pos, weights = _bilinear(_bilinear_axis(y, height), _bilinear_axis(x, width), width,
                                          (slice(None), slice(None), None, slice(None), None),
                                          (slice(None), None, slice(None), None, slice(None)))
        # offset_input = input + (roi_batch_ind * channels + c) * height * width: here row roi_batch_ind * h * w
        base = (batch[a:b] * (height * width))[:, None, None, None, None]
        v1, v2, v3, v4 = (pixels[base + torch.where(outside, torch.zeros_like(p), p)] for p in pos)
        w1, w2, w3, w4 = (torch.where(outside, torch.zeros_like(w), w)[..., None] for w in weights)
        val = w1 * v1 + w2 * v2 + w3 * v3 + w4 * v4  # (n, ph, pw, iy, ix, c)
        n = b - a
        if pool_mode == 0:
            maxval = torch.full((n, aligned_height, aligned_width, channels), -10000, dtype=dtype)
            maxidx_y = torch.full_like(maxval, -1)
            maxidx_x = torch.full_like(maxval, -1)
        else:
            output_val = torch.zeros((n, aligned_height, aligned_width, channels), dtype=dtype)
        for iy in range(upper_h):
            for ix in range(upper_w):
                sample = ((iy < gh) & (ix < gw))[:, None, None, None]
                v = val[:, :, :, iy, ix]
                if pool_mode == 0:
                    better = sample & (v > maxval)
                    maxval = torch.where(better, v, maxval)
                    maxidx_y = torch.where(better, y[:, :, None, iy, None], maxidx_y)
                    maxidx_x = torch.where(better, x[:, None, :, ix, None], maxidx_x)
                else:
                    output_val = torch.where(sample, output_val + v, output_val)
        if pool_mode == 0:
            out[a:b] = maxval.permute(0, 3, 1, 2)
            out_y[a:b] = maxidx_y.permute(0, 3, 1, 2)
            out_x[a:b] = maxidx_x.permute(0, 3, 1, 2)
        else:
            count = torch.clamp(gh * gw, min=1).to(dtype)[:, None, None, None]
            out[a:b] = (output_val / count).permute(0, 3, 1, 2)
    return None


def roi_align_backward(grad_output: torch.Tensor, rois: torch.Tensor, argmax_y: torch.Tensor,
                       argmax_x: torch.Tensor, grad_input: torch.Tensor, aligned_height: int, aligned_width: int,
                       spatial_scale: float, sampling_ratio: int, pool_mode: int, aligned: bool) -> None:
    """`roi_align_backward_cpu` (`ROIAlignBackward`, mmcv/ops/csrc/pytorch/cpu/roi_align.cpp): adds the gradient
    of `roi_align_forward`'s output into `grad_input`, in place.

    As the kernel, in `grad_output`'s dtype, with the forward's RoI geometry: for max pooling (`pool_mode` 0) each
    output element whose `argmax_y` is not -1 sends `grad * w_k` to the four pixels of
    `bilinear_interpolate_gradient(argmax_y, argmax_x)` (nothing when that sample lies outside: y < -1 or
    y > height, x likewise); for average pooling (1) each sample of its bin sends `grad * w_k / count`
    (count = grid_h * grid_w). The kernel adds these one at a time into `grad_input`, output element after
    output element (RoI, channel, ph, pw), then sample (iy, ix), then w1..w4, and the order of those float
    additions sets the result's last bits. The port lays the contributions out in that order (for average
    pooling channel-last: one row of channels per (RoI, ph, pw, iy, ix, k), which keeps each element's own
    order, the channels being apart) and adds them with `index_add_` along dim 0, which on the CPU adds its
    contributions one after the other in their order (the tests hold it to the transcribed kernel bit for
    bit); vectorised over chunks of consecutive RoIs, which keeps that order too.
    """
    channels, height, width = grad_input.size(1), grad_input.size(2), grad_input.size(3)
    pooled = channels * aligned_height * aligned_width
    n_rois = grad_output.numel() // pooled if pooled else 0
    if n_rois == 0 or pool_mode not in (0, 1):
        return None
    dtype = grad_output.dtype
    batch, start_h, start_w, bin_h, bin_w, grid_h, grid_w = _roi_align_geometry(
        rois[:n_rois], dtype, aligned_height, aligned_width, spatial_scale, sampling_ratio, aligned,
        "ROIs in ROIAlign do not have non-negative size!")
    grad = grad_output.reshape(n_rois, channels, aligned_height, aligned_width)
    if pool_mode == 0:  # the argmax, so the pixels, differ from channel to channel: one flat grad_input
        target = grad_input if grad_input.is_contiguous() else grad_input.contiguous()
        flat = target.view(-1)
        channel = torch.arange(channels)
        arg_y = argmax_y.reshape(n_rois, channels, aligned_height, aligned_width)
        arg_x = argmax_x.reshape(n_rois, channels, aligned_height, aligned_width)
        ones = [1] * n_rois
        for a, b in _roi_align_chunks(ones, ones, 4 * pooled):  # 4 flat contributions an element
            y, x = arg_y[a:b], arg_x[a:b]
            every = (slice(None),) * 4
            outside, pos, weights = _bilinear(_bilinear_axis(y, height), _bilinear_axis(x, width), width,
                                              every, every)
            g = grad[a:b]
            contributions = torch.stack([g * w for w in weights], -1)  # (n, c, ph, pw, k)
            base = ((batch[a:b, None] * channels + channel) * (height * width))[:, :, None, None]
            where = torch.stack([base + p for p in pos], -1)
            keep = ((y != -1) & ~outside)[..., None].expand_as(where)
            flat.index_add_(0, where[keep], contributions[keep])
    else:  # a sample's pixels are its RoI's in every channel: rows of channels
        target = grad_input.permute(0, 2, 3, 1).contiguous()
        pixels = target.view(-1, channels)  # (batch * height * width, channels)
        grid_h_t, grid_w_t = torch.tensor(grid_h, dtype=torch.int64), torch.tensor(grid_w, dtype=torch.int64)
        for a, b in _roi_align_chunks(grid_h, grid_w, pooled):
            upper_h, upper_w = max(grid_h[a:b]), max(grid_w[a:b])
            gh, gw = grid_h_t[a:b], grid_w_t[a:b]
            y = _roi_align_samples(start_h[a:b], bin_h[a:b], gh, aligned_height, upper_h)  # (n, ph, iy)
            x = _roi_align_samples(start_w[a:b], bin_w[a:b], gw, aligned_width, upper_w)  # (n, pw, ix)
            # (n, ph, pw, iy, ix)
            outside, pos, weights = _bilinear(_bilinear_axis(y, height), _bilinear_axis(x, width), width,
                                              (slice(None), slice(None), None, slice(None), None),
                                              (slice(None), None, slice(None), None, slice(None)))
            count = (gh * gw).to(dtype)[:, None, None, None, None, None]
            g = grad[a:b].permute(0, 2, 3, 1)[:, :, :, None, None, :]  # (n, ph, pw, 1, 1, c)
            contributions = torch.stack([g * w[..., None] / count for w in weights], -2)  # (n, ph, pw, iy, ix, k, c)
            base = (batch[a:b] * (height * width))[:, None, None, None, None]
            where = torch.stack([base + p for p in pos], -1)  # (n, ph, pw, iy, ix, k)
            iy, ix = torch.arange(upper_h), torch.arange(upper_w)
            sample = (iy[None, :, None] < gh[:, None, None]) & (ix[None, None, :] < gw[:, None, None])
            keep = (sample[:, None, None] & ~outside)[..., None].expand_as(where)
            pixels.index_add_(0, where[keep], contributions[keep])
        target = target.permute(0, 3, 1, 2)
    if target is not grad_input:
        grad_input.copy_(target)
    return None


# Deformable convolution (mmcv/ops/csrc/pytorch/cpu/deform_conv.cpp, modulated_deform_conv.cpp, and the drivers in
# mmcv/ops/csrc/pytorch/deform_conv.cpp, modulated_deform_conv.cpp) ---------------------------------------------
#
# The kernels loop over one element at a time; the ports below compute every element of a loop at once, in the
# same arithmetic (float32 `T`). The columns buffer is mmcv's: (C * kh * kw, n * Ho * Wo), row `c * kh * kw + tap`,
# column `(b * Ho + h) * Wo + w`. The modulated kernels are the plain ones with the mask folded in where they
# fold it; `mask=None` is the plain kernel.


def _deform_points(offset: torch.Tensor, kh: int, kw: int, pad_h: int, pad_w: int, stride_h: int, stride_w: int,
                   dilation_h: int, dilation_w: int, deformable_group: int):
    """`h_in + i * dilation_h + offset_h` and the `w` twin for every (image, deformable group, tap, h_col, w_col):
    two (n, dg, kh * kw, Ho, Wo) tensors from `offset` (n, dg * 2 * kh * kw, Ho, Wo)."""
    n, _, ho, wo = offset.shape
    off = offset.reshape(n, deformable_group, kh * kw, 2, ho, wo)
    i = torch.arange(kh).repeat_interleave(kw).view(1, 1, -1, 1, 1)
    j = torch.arange(kw).repeat(kh).view(1, 1, -1, 1, 1)
    h_in = (torch.arange(ho) * stride_h - pad_h).view(1, 1, 1, -1, 1)
    w_in = (torch.arange(wo) * stride_w - pad_w).view(1, 1, 1, 1, -1)
    # `h_in + i * dilation_h` is an int, converted to T when the offset is added
    return (h_in + i * dilation_h).to(offset.dtype) + off[:, :, :, 0], (w_in + j * dilation_w).to(offset.dtype) + off[:, :, :, 1]


def _per_channel(points: torch.Tensor, channels: int) -> torch.Tensor:
    """(n, dg, K, Ho, Wo) -> (n, C, K, Ho, Wo): channel c reads its deformable group `c / (C / dg)`."""
    return points.repeat_interleave(channels // points.size(1), dim=1)


def _corner_values(image: torch.Tensor, h_low, w_low, height: int, width: int):
    """v1..v4 of `deformable_im2col_bilinear_cpu` / `get_coordinate_weight_cpu`: `image` (n, C, H, W) read at the
    four corners (n, C, ...) of each point, 0 where the kernels' bounds tests fail."""
    flat = image.reshape(image.size(0), image.size(1), -1)

    def read(hh, ww, ok):
        index = (hh.clamp(0, height - 1) * width + ww.clamp(0, width - 1)).reshape(flat.size(0), flat.size(1), -1)
        return torch.where(ok, torch.gather(flat, 2, index).reshape(hh.shape), torch.zeros((), dtype=image.dtype))

    h_high, w_high = h_low + 1, w_low + 1
    return (read(h_low, w_low, (h_low >= 0) & (w_low >= 0)), read(h_low, w_high, (h_low >= 0) & (w_high <= width - 1)),
            read(h_high, w_low, (h_high <= height - 1) & (w_low >= 0)),
            read(h_high, w_high, (h_high <= height - 1) & (w_high <= width - 1)))


def _im2col_bilinear(image: torch.Tensor, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """`deformable_im2col_bilinear_cpu` (= `dmcn_im2col_bilinear_cpu`) at every point (n, C, ...)."""
    height, width = image.shape[-2:]
    h_low, w_low = torch.floor(h).to(torch.int64), torch.floor(w).to(torch.int64)
    lh, lw = h - h_low.to(h.dtype), w - w_low.to(w.dtype)
    hh, hw = 1 - lh, 1 - lw
    v1, v2, v3, v4 = _corner_values(image, h_low, w_low, height, width)
    val = hh * hw * v1 + hh * lw * v2 + lh * hw * v3 + lh * lw * v4
    return torch.where((h <= -1) | (height <= h) | (w <= -1) | (width <= w), torch.zeros((), dtype=val.dtype), val)


def _im2col(image, offset, mask, kh, kw, pad_h, pad_w, stride_h, stride_w, dilation_h, dilation_w, deformable_group):
    """`deformable_im2col_cpu_kernel` / `modulated_deformable_im2col_cpu_kernel`: the columns (C * K, n * Ho * Wo)."""
    n, c, height, width = image.shape
    h_im, w_im = _deform_points(offset, kh, kw, pad_h, pad_w, stride_h, stride_w, dilation_h, dilation_w,
                                deformable_group)
    h_im, w_im = _per_channel(h_im, c), _per_channel(w_im, c)
    inside = (h_im > -1) & (w_im > -1) & (h_im < height) & (w_im < width)
    val = torch.where(inside, _im2col_bilinear(image, h_im, w_im), torch.zeros((), dtype=image.dtype))
    if mask is not None:  # `*data_col_ptr = val * mask`
        val = val * _per_channel(mask.reshape(n, deformable_group, kh * kw, *mask.shape[-2:]), c)
    return val.permute(1, 2, 0, 3, 4).reshape(c * kh * kw, -1)


def _gradient_weight(argmax_h, argmax_w, h, w, height: int, width: int):
    """`get_gradient_weight_cpu` (= the dmcn one) for every (point, pixel) pair given."""
    zero = torch.zeros((), dtype=argmax_h.dtype)
    h_low, w_low = torch.floor(argmax_h).to(torch.int64), torch.floor(argmax_w).to(torch.int64)
    h_high, w_high = h_low + 1, w_low + 1
    hf, wf = h.to(argmax_h.dtype), w.to(argmax_w.dtype)
    weight = zero.expand_as(argmax_h)
    weight = torch.where((h == h_low) & (w == w_low), (hf + 1 - argmax_h) * (wf + 1 - argmax_w), weight)
    weight = torch.where((h == h_low) & (w == w_high), (hf + 1 - argmax_h) * (argmax_w + 1 - wf), weight)
    weight = torch.where((h == h_high) & (w == w_low), (argmax_h + 1 - hf) * (wf + 1 - argmax_w), weight)
    weight = torch.where((h == h_high) & (w == w_high), (argmax_h + 1 - hf) * (argmax_w + 1 - wf), weight)
    empty = (argmax_h <= -1) | (argmax_h >= height) | (argmax_w <= -1) | (argmax_w >= width)
    return torch.where(empty, zero, weight)


def _col2im(columns, offset, mask, grad_im, kh, kw, pad_h, pad_w, stride_h, stride_w, dilation_h, dilation_w,
            deformable_group):
    """`deformable_col2im_cpu_kernel` / `modulated_deformable_col2im_cpu_kernel`: adds into `grad_im` (n, C, H, W)."""
    n, c, height, width = grad_im.shape
    ho, wo = offset.shape[-2:]
    h_inv, w_inv = _deform_points(offset, kh, kw, pad_h, pad_w, stride_h, stride_w, dilation_h, dilation_w,
                                  deformable_group)
    h_inv, w_inv = _per_channel(h_inv, c), _per_channel(w_inv, c)  # (n, C, K, Ho, Wo)
    top = columns.reshape(c, kh * kw, n, ho, wo).permute(2, 0, 1, 3, 4)
    if mask is not None:  # `cur_top_grad = data_col[index] * mask`
        top = top * _per_channel(mask.reshape(n, deformable_group, kh * kw, ho, wo), c)
    cur_h, cur_w = h_inv.to(torch.int64), w_inv.to(torch.int64)  # `(int)` truncates toward zero
    plane = (torch.arange(n).view(-1, 1, 1, 1, 1) * c + torch.arange(c).view(1, -1, 1, 1, 1)) * (height * width)
    flat = grad_im.view(-1)
    for dy in range(-2, 3):
        for dx in range(-2, 3):
            yy, xx = cur_h + dy, cur_w + dx
            ok = ((yy >= 0) & (yy < height) & (xx >= 0) & (xx < width) & ((h_inv - yy.to(h_inv.dtype)).abs() < 1)
                  & ((w_inv - xx.to(w_inv.dtype)).abs() < 1))
            weight = _gradient_weight(h_inv, w_inv, yy, xx, height, width)
            flat.index_add_(0, (plane + yy * width + xx)[ok], (weight * top)[ok])


def _coordinate_weights(argmax_h, argmax_w, image, height: int, width: int):
    """`get_coordinate_weight_cpu` for `bp_dir` 0 and 1 at every point (n, C, K, Ho, Wo) of `image`'s channels."""
    zero = torch.zeros((), dtype=argmax_h.dtype)
    empty = (argmax_h <= -1) | (argmax_h >= height) | (argmax_w <= -1) | (argmax_w >= width)
    h_low, w_low = torch.floor(argmax_h).to(torch.int64), torch.floor(argmax_w).to(torch.int64)
    v1, v2, v3, v4 = _corner_values(image, torch.where(empty, 0, h_low), torch.where(empty, 0, w_low), height, width)
    hl, wl = h_low.to(argmax_h.dtype), w_low.to(argmax_w.dtype)
    # the kernel adds the four terms in this order onto `weight = 0`
    dir0 = zero + -1 * (wl + 1 - argmax_w) * v1
    dir0 = dir0 + -1 * (argmax_w - wl) * v2
    dir0 = dir0 + (wl + 1 - argmax_w) * v3
    dir0 = dir0 + (argmax_w - wl) * v4
    dir1 = zero + -1 * (hl + 1 - argmax_h) * v1
    dir1 = dir1 + (hl + 1 - argmax_h) * v2
    dir1 = dir1 + -1 * (argmax_h - hl) * v3
    dir1 = dir1 + (argmax_h - hl) * v4
    return torch.where(empty, zero, dir0), torch.where(empty, zero, dir1)


def _col2im_coord(columns, image, offset, mask, kh, kw, pad_h, pad_w, stride_h, stride_w, dilation_h, dilation_w,
                  deformable_group):
    """`deformable_col2im_coord_cpu_kernel` / the modulated one: (grad_offset (n, dg * 2 * K, Ho, Wo), grad_mask
    (n, dg * K, Ho, Wo) or None); each a sum over the channels of the deformable group, in channel order."""
    n, c, height, width = image.shape
    ho, wo = offset.shape[-2:]
    k = kh * kw
    inv_h, inv_w = _deform_points(offset, kh, kw, pad_h, pad_w, stride_h, stride_w, dilation_h, dilation_w,
                                  deformable_group)
    outside = (inv_h <= -1) | (inv_w <= -1) | (inv_h >= height) | (inv_w >= width)
    inv_h = torch.where(outside, -2.0, inv_h).to(offset.dtype)
    inv_w = torch.where(outside, -2.0, inv_w).to(offset.dtype)
    inv_h, inv_w = _per_channel(inv_h, c), _per_channel(inv_w, c)
    col = columns.reshape(c, k, n, ho, wo).permute(2, 0, 1, 3, 4)  # (n, C, K, Ho, Wo)
    dir0, dir1 = _coordinate_weights(inv_h, inv_w, image, height, width)
    m = 1 if mask is None else _per_channel(mask.reshape(n, deformable_group, k, ho, wo), c)
    cpg = c // deformable_group

    def channel_sum(t):  # `val += ...` over cnt = 0, 1, ...: a running sum in channel order
        t = t.reshape(n, deformable_group, cpg, k, ho, wo)
        acc = torch.zeros_like(t[:, :, 0])
        for cnt in range(cpg):
            acc = acc + t[:, :, cnt]
        return acc

    grad_offset = torch.stack([channel_sum(dir0 * col * m), channel_sum(dir1 * col * m)], dim=3)
    grad_offset = grad_offset.reshape(n, deformable_group * 2 * k, ho, wo)
    if mask is None:
        return grad_offset, None
    inside = _per_channel(~outside, c)
    value = torch.where(inside, _im2col_bilinear(image, inv_h, inv_w), torch.zeros((), dtype=image.dtype))
    return grad_offset, channel_sum(col * value).reshape(n, deformable_group * k, ho, wo)


def _check_cpu_input(**tensors) -> None:
    """The drivers' `CHECK_CPU_INPUT`: every tensor the kernel reads or writes through `data_ptr` is contiguous."""
    for name, t in tensors.items():
        if t is not None and t.numel() and not t.is_contiguous():
            raise RuntimeError(f"{name} must be contiguous")


def _out_hw(height, width, kh, kw, pad_h, pad_w, stride_h, stride_w, dilation_h, dilation_w):
    return ((height + 2 * pad_h - (dilation_h * (kh - 1) + 1)) // stride_h + 1,
            (width + 2 * pad_w - (dilation_w * (kw - 1) + 1)) // stride_w + 1)


def deform_conv_forward(input, weight, offset, output, columns, ones, kW, kH, dW, dH, padW, padH, dilationW,
                        dilationH, group, deformable_group, im2col_step) -> None:
    """`deform_conv_forward` (mmcv/ops/csrc/pytorch/deform_conv.cpp) into `output`: per chunk of `im2col_step`
    images, the columns, then per group `output_buffer[g] += weight[g].flatten(1) @ columns[g]`."""
    _check_cpu_input(input=input, weight=weight, offset=offset, output=output)
    n, c, height, width = input.shape
    o = weight.size(0)
    ho, wo = _out_hw(height, width, kH, kW, padH, padW, dH, dW, dilationH, dilationW)
    geometry = (kH, kW, padH, padW, dH, dW, dilationH, dilationW, deformable_group)
    for start in range(0, n, im2col_step):
        cols = _im2col(input[start:start + im2col_step], offset[start:start + im2col_step], None, *geometry)
        cols = cols.view(group, -1, cols.size(1))
        w = weight.reshape(group, o // group, -1)
        buffer = torch.zeros(group, o // group, cols.size(2), dtype=input.dtype)
        for g in range(group):
            buffer[g].addmm_(w[g], cols[g])
        output[start:start + im2col_step] = buffer.reshape(o, -1, ho, wo).transpose(0, 1)


def deform_conv_backward_input(input, offset, gradOutput, gradInput, gradOffset, weight, columns, kW, kH, dW, dH,
                               padW, padH, dilationW, dilationH, group, deformable_group, im2col_step) -> None:
    """`deform_conv_backward_input`: per chunk, `columns[g] = weight[g].flatten(1).T @ gradOutput[g]`, then
    `col2im_coord` into `gradOffset` and `col2im` into `gradInput` (both in place)."""
    _check_cpu_input(input=input, offset=offset, gradOutput=gradOutput, gradInput=gradInput, gradOffset=gradOffset, weight=weight)
    n = input.size(0)
    o = weight.size(0)
    geometry = (kH, kW, padH, padW, dH, dW, dilationH, dilationW, deformable_group)
    for start in range(0, n, im2col_step):
        stop = start + im2col_step
        grad = gradOutput[start:stop].transpose(0, 1).reshape(group, o // group, -1)
        w = weight.reshape(group, o // group, -1)
        cols = torch.cat([w[g].transpose(0, 1) @ grad[g] for g in range(group)], 0)
        gradOffset[start:stop] = _col2im_coord(cols, input[start:stop], offset[start:stop], None, *geometry)[0]
        _col2im(cols, offset[start:stop], None, gradInput[start:stop], *geometry)


def deform_conv_backward_parameters(input, offset, gradOutput, gradWeight, columns, ones, kW, kH, dW, dH, padW,
                                    padH, dilationW, dilationH, group, deformable_group, scale, im2col_step) -> None:
    """`deform_conv_backward_parameters`: per chunk, `gradWeight[g] += scale * gradOutput[g] @ columns[g].T`."""
    _check_cpu_input(input=input, offset=offset, gradOutput=gradOutput, gradWeight=gradWeight)
    n = input.size(0)
    o = gradWeight.size(0)
    geometry = (kH, kW, padH, padW, dH, dW, dilationH, dilationW, deformable_group)
    flat = gradWeight.view(group, o // group, -1)
    for start in range(0, n, im2col_step):
        stop = start + im2col_step
        cols = _im2col(input[start:stop], offset[start:stop], None, *geometry)
        cols = cols.view(group, -1, cols.size(1))
        grad = gradOutput[start:stop].transpose(0, 1).reshape(group, o // group, -1)
        for g in range(group):
            flat[g].addmm_(grad[g], cols[g].transpose(1, 0), beta=1.0, alpha=scale)


def modulated_deform_conv_forward(input, weight, bias, ones, offset, mask, output, columns, kernel_h, kernel_w,
                                  stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group, deformable_group,
                                  with_bias) -> None:
    """`modulated_deform_conv_forward` into `output`: image by image, the masked columns, then per group
    `output[b][g] += weight[g].flatten(1) @ columns[g]`; the bias added at the end."""
    _check_cpu_input(input=input, weight=weight, bias=bias, offset=offset, mask=mask, output=output)
    n = input.size(0)
    o = weight.size(0)
    geometry = (kernel_h, kernel_w, pad_h, pad_w, stride_h, stride_w, dilation_h, dilation_w, deformable_group)
    out = torch.zeros(n, group, o // group, offset.size(2) * offset.size(3), dtype=input.dtype)
    w = weight.reshape(group, o // group, -1)
    for b in range(n):
        cols = _im2col(input[b:b + 1], offset[b:b + 1], mask[b:b + 1], *geometry).view(group, -1, out.size(3))
        for g in range(group):
            out[b, g].addmm_(w[g], cols[g])
    out = out.reshape(n, o, offset.size(2), offset.size(3))
    if with_bias:
        out += bias.view(1, -1, 1, 1)
    output.copy_(out)


def modulated_deform_conv_backward(input, weight, bias, ones, offset, mask, columns, grad_input, grad_weight,
                                   grad_bias, grad_offset, grad_mask, grad_output, kernel_h, kernel_w, stride_h,
                                   stride_w, pad_h, pad_w, dilation_h, dilation_w, group, deformable_group,
                                   with_bias) -> None:
    """`modulated_deform_conv_backward`, image by image: columns = W^T grad, `col2im_coord` (offset and mask
    gradients), `col2im` (input gradient), the columns again, `grad_weight[g] += grad[g] @ columns[g].T` and the
    bias gradient as `grad[g] @ ones`; everything written into the given tensors."""
    _check_cpu_input(input=input, weight=weight, bias=bias, offset=offset, mask=mask, grad_input=grad_input, grad_weight=grad_weight, grad_bias=grad_bias, grad_offset=grad_offset, grad_mask=grad_mask, grad_output=grad_output)
    n = input.size(0)
    o = weight.size(0)
    geometry = (kernel_h, kernel_w, pad_h, pad_w, stride_h, stride_w, dilation_h, dilation_w, deformable_group)
    w = weight.reshape(group, o // group, -1)
    gw = grad_weight.view(group, o // group, -1)
    for b in range(n):
        grad = grad_output[b].reshape(group, o // group, -1)
        cols = torch.cat([w[g].transpose(0, 1) @ grad[g] for g in range(group)], 0)
        d_offset, d_mask = _col2im_coord(cols, input[b:b + 1], offset[b:b + 1], mask[b:b + 1], *geometry)
        grad_offset[b:b + 1] = d_offset
        grad_mask[b:b + 1] = d_mask
        _col2im(cols, offset[b:b + 1], mask[b:b + 1], grad_input[b:b + 1], *geometry)
        cols = _im2col(input[b:b + 1], offset[b:b + 1], mask[b:b + 1], *geometry).view(group, -1, grad.size(2))
        for g in range(group):
            gw[g].addmm_(grad[g], cols[g].transpose(0, 1))
            if with_bias:
                grad_bias.view(group, -1)[g] += (grad[g] @ torch.ones(grad.size(2), 1, dtype=grad.dtype)).view(-1)


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)

    def not_ported(*args, **kwargs):
        raise NotImplementedError(f"mmcv._ext.{name}: this mmcv CPU kernel has no port in tests/mmcv_ext.py yet "
                                  f"(ported: {', '.join(PORTED)})")

    not_ported.__name__ = name
    return not_ported


def install() -> None:
    """Make `import mmcv._ext` find this module (idempotent)."""
    sys.modules.setdefault("mmcv._ext", sys.modules[__name__])
