"""How a run computes: its compute dtype and its rematerialisation policy, chosen by name in the config.

`config.dtype` ('float32' | 'bfloat16') is the dtype convolutions, matmuls and the
CanKD attention compute in, for the student, the teacher, the connectors and the
losses that have a `dtype` field. Parameters, optimizer state and BatchNorm running
statistics stay float32 whatever it is (every module keeps `param_dtype=float32`),
so checkpoints and exports are float32 too; BatchNorm and instance-norm statistics,
the task loss, the distillation MSEs and every loss reduction are computed in
float32 from the (bfloat16) activations.

`config.remat` names a `jax.checkpoint` policy: which intermediate values of the
student's stem, residual blocks and heads are kept for the backward pass; the rest
is recomputed there. 'none' keeps everything (no rematerialisation). The
distillation terms (connector + loss) are not rematerialised: they run last in the
forward pass and first in the backward pass, so recomputing them would bring their
activations back at the step's peak (the start of the backward pass, every student
residual still live) and save nothing there.

How a dilated convolution is computed (`dilated_conv`, a trace-time choice, not a
config key: every form gives the same numbers up to float rounding, with the same
parameters): 'batched' runs a stride-1 dilated convolution as an undilated one over
the d x d interleaved sub-images of its input (`models.conv.dilated_as_batched`);
'wgrad' keeps the dilated convolution for the forward pass and the input gradient
and computes only the weight gradient over sub-images
(`models.conv.dilated_conv_batched_wgrad`); 'native' hands XLA the dilated
convolution itself; 'auto' (the default) is 'batched' on GPUs and 'native'
elsewhere, as measured on the paper's Cityscapes step: on one H200 (bfloat16, 8
images) 65.0 ms native, 52.6 ms batched in one sitting, 48.8 ms batched and 49.1 ms
wgrad (0.23 GB less memory) in another, because cuDNN's kernels for a dilated
convolution's weight gradient are slow (`results/gpu/README.md`); on this project's
2-core CPU (the student alone, 128x256, 2 images) 744 ms native, 4170 ms batched,
XLA:CPU being slow on many tiny images (`results/train_speed/cpu.md`). TPUs are
unmeasured, so they keep the native form. `with dilated_conv('native'):` around
tracing (init, jit lowering) selects a form.

How the other k x k convolutions are computed (`conv_form`, trace-time as well, the same
numbers up to float rounding): 'native' is XLA's convolution; 'taps' writes a convolution
as the sum over its k x k taps of a matmul of the input, shifted by the tap and cut to
the pixels it reaches, with the tap's (C, O) kernel slice (`models.conv.conv_as_tap_matmuls`),
so the forward pass and both gradients are matmuls, and a dilated tap that reaches no
pixel (the ASPP's dilations 24/36 on a small map) costs nothing; 'tap_forward' computes the
forward pass as taps and the gradients as XLA's convolutions (`models.conv.conv_tap_forward`);
'im2col' is the taps where nothing is differentiated and, in training, one matmul over the input's
k x k shifted copies side by side, its gradients two matmuls (`models.conv.conv_im2col`);
'wide_taps' picks per convolution: below 256 input channels native, from 256 'taps' where at
least a quarter of the native form's reads fall on padding (`real_share`), else 'im2col' where
the convolution keeps at least half its channels and 'tap_forward' where it narrows them more;
grouped convolutions, and dilated ones in the 'batched'/'wgrad' forms, stay as they are.
'auto' (the default) is 'wide_taps' on CPUs and 'native' on other backends (cuDNN's
convolutions are fast; TPUs unmeasured).

Why, on this project's 2-core CPU (`results/train_speed/conv_cpu.md`): XLA:CPU's convolutions
once ran well below its matmul rate (a slow host: the Cityscapes student's convolutions 3.0 s
native, 1.6 s as taps, 2.6 s in PyTorch); on the faster hosts since, taps still win forward
passes from 256 channels, by up to a quarter of the time (the teacher's 512-channel 3x3s: 28 ms
native, 21 ms as taps), while in training XLA's own gradient convolutions beat the taps' (the taps'
backward pads each tap's input gradient back and transposes each tap's cotangent: the dlv3
student's 512-channel 3x3, forward + backward with its BatchNorm and ReLU, 86 ms native, 100 ms
as taps, 80 ms as 'tap_forward'), except where padding dominates (that student's ASPP branch
with dilation 36 on a 16 x 32 map: 76 ms native, 4 ms as taps). At 32 and 64 channels taps are
slower, at 128 even, and a small network's step (the segmentation demo, 64-192 channels on 8x8
maps) ran slower with taps from 64 channels (51-54 ms against 39-51 ms native). In training, one im2col
matmul of depth k k C beats both where the convolution keeps or widens its channels (the same 512-channel 3x3:
87 ms against 106 native and 116 'tap_forward' on an Intel Xeon host, 2026-12-08); where it narrows them
(640 -> 128) the input-wide cotangent of its copies costs more than the matmul saves (47 ms against 35).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Iterator, Optional

import jax
import jax.numpy as jnp

DTYPES = ("float32", "bfloat16")

_cp = jax.checkpoint_policies
# name -> policy (None: no jax.checkpoint at all).
REMAT_POLICIES: dict[str, Optional[Callable[..., bool]]] = {
    "none": None,
    # Keep the outputs of convolutions and matmuls, recompute the elementwise work after them
    # (BatchNorm, ReLU, additions): a little recomputation, the largest share of the saving.
    "dots_saveable": _cp.dots_saveable,
    # Keep only matmuls without batch dimensions (1x1 convs written as matmuls); recompute the rest.
    "dots_with_no_batch_dims_saveable": _cp.dots_with_no_batch_dims_saveable,
    # Keep only each block's input: the whole block is recomputed in the backward pass.
    "nothing_saveable": _cp.nothing_saveable,
}


def float_dtype(value: Any) -> Optional[Any]:
    """`value` (a name or a dtype) as a floating dtype, bfloat16 included; None where it names none (an unknown
    name, an integer dtype)."""
    try:
        dtype = jnp.dtype(value)
    except TypeError:
        return None
    return dtype if jnp.issubdtype(dtype, jnp.floating) else None


def compute_dtype(name: Optional[str]) -> Optional[Any]:
    """The modules' `dtype` for `config.dtype`: None for float32 (they compute in their inputs' dtype,
    float32), `jnp.bfloat16` for bfloat16. Unknown names raise a ValueError listing the valid ones."""
    name = name or "float32"
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return None if name == "float32" else jnp.dtype(name)


def remat_policy(name: Optional[str]) -> Optional[Callable[..., bool]]:
    """The `jax.checkpoint` policy of `config.remat` (None for 'none')."""
    name = name or "none"
    if name not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {name!r}; choose one of {', '.join(REMAT_POLICIES)}")
    return REMAT_POLICIES[name]


def checkpointed(fn: Callable, name: Optional[str]) -> Callable:
    """`fn` under `jax.checkpoint` with the named policy, or `fn` itself for 'none'."""
    policy = remat_policy(name)
    return fn if (name or "none") == "none" else jax.checkpoint(fn, policy=policy)


CONV_FORMS = ("auto", "native", "taps", "tap_forward", "im2col", "wide_taps")
# Below this many input channels a tap's matmul is too thin to beat XLA:CPU's convolution (conv_cpu.md: slower
# at 32 and 64, even at 128, ahead from 256).
TAPS_MIN_CHANNELS = 256
# A wide convolution takes taps in its gradients too when its native form would spend at least a quarter of its
# multiply-adds on padding (a real share <= 0.75: the ASPP's dilations 12/24/36 on small maps); with less padding
# XLA:CPU's own gradient convolutions beat the taps' (conv_cpu.md, 2026-12-07).
TAPS_MAX_REAL_SHARE = 0.75
# In training, a wide convolution that keeps at least half its channels runs fastest as one im2col matmul; one that
# narrows them more (640 -> 128, 256 -> 64) pays more for its input-wide cotangent than the matmul saves
# (conv_cpu.md, 2026-12-08).
IM2COL_MIN_WIDTH = 0.5
_conv_form: contextvars.ContextVar[str] = contextvars.ContextVar("conv_form", default="auto")


@contextlib.contextmanager
def _traced_in(var: contextvars.ContextVar[str], name: str, known: tuple[str, ...], what: str) -> Iterator[None]:
    """`var` set to `name` (one of `known`, else a ValueError naming `what` and the choices) inside the block."""
    if name not in known:
        raise ValueError(f"unknown {what} form {name!r}; choose one of {', '.join(known)}")
    token = var.set(name)
    try:
        yield
    finally:
        var.reset(token)


def conv_form(name: str) -> contextlib.AbstractContextManager[None]:
    """Trace k x k convolutions in the named form ('auto', 'native', 'taps', 'tap_forward', 'im2col' or
    'wide_taps') inside the block."""
    return _traced_in(_conv_form, name, CONV_FORMS, "convolution")


def real_share(size: tuple[int, int], kernel_size: int, stride: int, dilation: int) -> float:
    """The share of a native convolution's tap reads that land on real pixels, not on its padding: a k x k kernel
    with PyTorch's symmetric padding `dilation * (k // 2)` over a `size = (H, W)` map, in [0, 1]. Each tap reads
    one input pixel per output pixel; the share is the rows' times the columns'."""
    pad = dilation * (kernel_size // 2)
    share = 1.0
    for n in size:
        out = (n + 2 * pad - dilation * (kernel_size - 1) - 1) // stride + 1
        inside = sum(0 <= r * stride + i * dilation - pad < n for i in range(kernel_size) for r in range(out))
        share *= inside / (kernel_size * out)
    return share


def conv_form_for(size: tuple[int, int], in_channels: int, kernel_size: int, stride: int, dilation: int,
                  groups: int, out_channels: int) -> str:
    """The form a k x k convolution over a `size = (H, W)` map from `in_channels` to `out_channels` is traced in
    here: 'native', 'taps', 'tap_forward' or 'im2col'. 'auto' is 'wide_taps' on CPUs, else 'native'. 'wide_taps'
    resolves by the convolution: below `TAPS_MIN_CHANNELS` inputs 'native'; from there 'taps' if at most
    `TAPS_MAX_REAL_SHARE` of its native reads are real (`real_share`); else 'im2col' if it keeps at least
    `IM2COL_MIN_WIDTH` of its channels, 'tap_forward' if it narrows them more. Grouped convolutions stay
    native."""
    form = _conv_form.get()
    if form == "auto":
        form = "wide_taps" if jax.default_backend() == "cpu" else "native"
    if groups != 1:
        return "native"
    if form == "wide_taps":
        if in_channels < TAPS_MIN_CHANNELS:
            return "native"
        if real_share(size, kernel_size, stride, dilation) <= TAPS_MAX_REAL_SHARE:
            return "taps"
        return "im2col" if out_channels >= IM2COL_MIN_WIDTH * in_channels else "tap_forward"
    return form


DILATED_CONV = ("auto", "batched", "wgrad", "native")
_dilated_conv: contextvars.ContextVar[str] = contextvars.ContextVar("dilated_conv", default="auto")


def dilated_conv(name: str) -> contextlib.AbstractContextManager[None]:
    """Trace dilated convolutions in the named form ('auto', 'batched', 'wgrad' or 'native') inside the block."""
    return _traced_in(_dilated_conv, name, DILATED_CONV, "dilated convolution")


def dilated_conv_form() -> str:
    """The form dilated convolutions are traced in here, 'batched', 'wgrad' or 'native' ('auto' resolved by the
    default backend: 'batched' on GPUs)."""
    form = _dilated_conv.get()
    if form == "auto":
        return "batched" if jax.default_backend() == "gpu" else "native"
    return form
