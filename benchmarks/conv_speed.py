"""The paper's Cityscapes pairing convolution by convolution: each k x k convolution of the student's train step
(forward + backward) and of the teacher's part of the step, in XLA's form ('native'), as tap matmuls ('taps',
`cankd_jax.models.conv.conv_as_tap_matmuls`), with the forward pass only as taps ('tap_forward'), as one im2col
matmul in training ('im2col', `conv_im2col`) and in PyTorch (`F.conv2d`, eager, as many threads as cores), in the
same run.

The convolutions are read off the networks themselves: the student's forward pass and the teacher's as the step
runs it (`step.teacher_features`: inference mode, up to the features the distillation terms read, its other heads
dropped by dead-code elimination as XLA drops them) are traced (`jax.make_jaxpr`, both forms forced to 'native')
and every `conv_general_dilated` in them is collected with its shapes, stride, padding and dilation; identical ones
are timed once and counted. 1x1 convolutions are matmuls in
our networks and do not appear. The teacher's rows time `y = conv(x, w)` (forward only, as the step runs it); the
student's the gradients with respect to x and w of `sum(relu(bn(conv(x, w))) * g)`, `bn` a training-mode
BatchNorm without affine parameters (forward + backward as the networks run it: every k x k convolution of theirs
feeds a BatchNorm, most of them a ReLU after it, so the forward output is computed and the backward's cotangent depends on it; the
gradients of a plain `sum(y * g)` need no forward pass, which XLA then drops and PyTorch does not). Compilation
excluded, median of `--repeats` calls, each waited for. 'tap_forward' (`conv_tap_forward`: the forward pass as
taps, XLA's gradient convolutions) and 'im2col' (the taps where nothing is differentiated, one matmul over the
input's shifted copies in training) have their own timings in the student's rows only; in a forward row they are
the taps'. The `wide_taps picks` column is the form `conv_form('wide_taps')` runs for that convolution
(`compute.conv_form_for`: from 256 input channels taps, in the gradients too where padding takes a quarter of
the native reads, else im2col where the convolution keeps half its channels), and the ratio is its time against
PyTorch's. Totals weight each row by its count.

    python benchmarks/conv_speed.py                                   # dlv3 at the CPU shape: 128x256, 2 images
    python benchmarks/conv_speed.py --height 512 --width 1024 --batch 8 --no-teacher
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from roi_align_speed import time_calls  # this folder's scripts: the same median-of-calls timer  # noqa: E402
from train_speed import case_config  # noqa: E402

from jax._src.interpreters import partial_eval as pe  # noqa: E402 - dce_jaxpr: no public dead-code elimination

from cankd_jax.compute import conv_form, conv_form_for, dilated_conv  # noqa: E402
from cankd_jax.models.conv import conv_as_tap_matmuls, conv_im2col, conv_tap_forward  # noqa: E402
import arg_types  # this folder's command-line value types  # noqa: E402

# (input shape, kernel shape, strides, padding, dilation, groups)
Conv = tuple[tuple[int, ...], tuple[int, ...], tuple[int, int], tuple[tuple[int, int], ...], tuple[int, int], int]


def _convs(jaxpr, found: collections.Counter) -> None:
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            p = eqn.params
            found[(tuple(eqn.invars[0].aval.shape), tuple(eqn.invars[1].aval.shape), tuple(p["window_strides"]),
                   tuple(tuple(x) for x in p["padding"]), tuple(p["rhs_dilation"]), p["feature_group_count"])] += 1
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    _convs(inner, found)


def traced_convs(fn, *args) -> collections.Counter:
    """Counter of the k x k convolutions that `fn(*args)` computes: traced with both forms forced to 'native',
    what its outputs do not need eliminated, as XLA eliminates it."""
    found: collections.Counter = collections.Counter()
    with conv_form("native"), dilated_conv("native"):
        closed = jax.make_jaxpr(fn)(*args)
    jaxpr, _ = pe.dce_jaxpr(closed.jaxpr, [True] * len(closed.jaxpr.outvars))
    _convs(jaxpr, found)
    return found


def teacher_step_convs(run, size: tuple[int, int], batch: int) -> collections.Counter:
    """The k x k convolutions the train step runs in `run`'s teacher on `(batch, *size, 3)` images."""
    from cankd_jax.train.step import teacher_features

    names = {t.teacher_feature for t in run.terms}
    x = jax.ShapeDtypeStruct((batch, *size, 3), jnp.float32)
    return traced_convs(lambda v, x: teacher_features(run.teacher, v, x, names), run.teacher_vars, x)


def network_convs(module, size: tuple[int, int], batch: int) -> collections.Counter:
    """The k x k convolutions in `module`'s forward pass on `(batch, *size, 3)` images."""
    x = jax.ShapeDtypeStruct((batch, *size, 3), jnp.float32)
    return traced_convs(lambda x: module.init_with_output(jax.random.key(0), x, train=False), x)


JAX_FORMS = {"native": jax.lax.conv_general_dilated, "taps": conv_as_tap_matmuls, "tap_forward": conv_tap_forward,
             "im2col": conv_im2col}
TAP_FORMS = ("taps", "tap_forward", "im2col")  # not for grouped convolutions


def jax_conv(form: str):
    def conv(x, w, strides, padding, dilation, groups):
        return JAX_FORMS[form](x, w, strides, padding, rhs_dilation=dilation,
                               dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)
    return conv


def _bn_relu(y):
    # BatchNorm2d in training mode without affine parameters (biased batch variance, eps 1e-5), then ReLU.
    mean = jnp.mean(y, axis=(0, 1, 2))
    var = jnp.mean(jnp.square(y - mean), axis=(0, 1, 2))
    return jax.nn.relu((y - mean) * jax.lax.rsqrt(var + 1e-5))


def time_jax(form: str, spec: Conv, x, w, g, backward: bool, repeats: int) -> float:
    _, _, strides, padding, dilation, groups = spec
    conv = jax_conv(form)
    if backward:
        fn = jax.jit(jax.grad(lambda x, w: jnp.sum(_bn_relu(conv(x, w, strides, padding, dilation, groups)) * g),
                              (0, 1)))
    else:
        fn = jax.jit(lambda x, w: conv(x, w, strides, padding, dilation, groups))
    return time_calls(lambda: jax.block_until_ready(fn(x, w)), repeats)[0]


def time_torch(spec: Conv, x, w, g, backward: bool, repeats: int) -> float:
    import torch
    import torch.nn.functional as F

    _, _, strides, padding, dilation, groups = spec
    (pt, pb), (pl, pr) = padding
    assert pt == pb and pl == pr, "PyTorch's conv2d pads symmetrically"
    xt = torch.from_numpy(np.ascontiguousarray(np.transpose(np.asarray(x), (0, 3, 1, 2)))).requires_grad_(backward)
    wt = torch.from_numpy(np.ascontiguousarray(np.transpose(np.asarray(w), (3, 2, 0, 1)))).requires_grad_(backward)
    gt = torch.from_numpy(np.ascontiguousarray(np.transpose(np.asarray(g), (0, 3, 1, 2))))

    def call():
        if not backward:
            with torch.no_grad():
                return F.conv2d(xt, wt, stride=strides, padding=(pt, pl), dilation=dilation, groups=groups)
        xt.grad = wt.grad = None
        y = F.conv2d(xt, wt, stride=strides, padding=(pt, pl), dilation=dilation, groups=groups)
        (F.relu(F.batch_norm(y, None, None, training=True)) * gt).sum().backward()

    return time_calls(call, repeats)[0]


def measure(spec: Conv, backward: bool, repeats: int) -> dict:
    xs, ws, strides, padding, dilation, groups = spec
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(xs), jnp.float32)
    w = jnp.asarray(rng.standard_normal(ws) * 0.05, jnp.float32)
    y = jax.eval_shape(lambda x, w: jax_conv("native")(x, w, strides, padding, dilation, groups), x, w)
    g = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
    row = {"native": time_jax("native", spec, x, w, g, backward, repeats),
           "torch": time_torch(spec, x, w, g, backward, repeats)}
    if groups == 1:
        row["taps"] = time_jax("taps", spec, x, w, g, backward, repeats)
        # Their forward passes are the taps' own: timed only where the gradients run too.
        for form in ("tap_forward", "im2col"):
            row[form] = time_jax(form, spec, x, w, g, True, repeats) if backward else row["taps"]
    return row


def table(title: str, found: collections.Counter, backward: bool, repeats: int) -> str:
    what = "forward + backward, each with a BatchNorm and a ReLU" if backward else "forward"
    lines = [f"### {title}: {sum(found.values())} convolutions, {len(found)} distinct ({what}, ms per call)", "",
             "| input (B, H, W, C) | kernel (kh, kw, C/g, O) | stride | dilation | groups | count | native | taps "
             "| tap_forward | im2col | PyTorch | wide_taps picks | wide_taps / PyTorch |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    totals = collections.Counter()
    for spec, count in sorted(found.items(), key=lambda kv: (-kv[0][0][1], kv[0][0][3], kv[0][4])):
        row = measure(spec, backward, repeats)
        xs, ws, strides, _, dilation, groups = spec
        with conv_form("wide_taps"):  # the library's own rule picks the column
            picks = conv_form_for(xs[1:3], xs[-1], ws[0], strides[0], dilation[0], groups, ws[-1])
        row["wide_taps"] = row[picks]
        for k, v in row.items():
            totals[k] += count * v * 1e3
        for form in TAP_FORMS:  # grouped: native in every total
            totals[form] += 0 if form in row else count * row["native"] * 1e3
        taps = " | ".join(f"{row[f] * 1e3:.1f}" if f in row else "-" for f in TAP_FORMS)
        lines.append(f"| {xs} | {ws} | {strides[0]} | {dilation[0]} | {groups} | {count} | "
                     f"{row['native'] * 1e3:.1f} | {taps} | {row['torch'] * 1e3:.1f} | {picks} | "
                     f"{row['wide_taps'] / row['torch']:.2f} |")
        print(lines[-1], file=sys.stderr, flush=True)
    lines.append(f"| **total (x count)** | | | | | | **{totals['native']:.0f}** | "
                 + "".join(f"**{totals[f]:.0f}** | " for f in TAP_FORMS)
                 + f"**{totals['torch']:.0f}** | **{totals['wide_taps']:.0f}** | "
                 f"**{totals['wide_taps'] / totals['torch']:.2f}** |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case", default="dlv3", help="a benchmarks/train_speed.py case with a teacher")
    ap.add_argument("--height", type=arg_types.count(1), default=128)
    ap.add_argument("--width", type=arg_types.count(1), default=256)
    ap.add_argument("--batch", type=arg_types.count(1), default=2)
    ap.add_argument("--repeats", type=arg_types.count(1), default=7)
    ap.add_argument("--no-teacher", action="store_true", help="the student's convolutions only")
    args = ap.parse_args(argv)

    import torch

    from cankd_jax.train import build
    from cankd_jax.train.sharding import make_mesh

    torch.set_num_threads(os.cpu_count() or 1)
    config = case_config(args.case, "loss", "cankd").copy_and_resolve_references()
    config.teacher.checkpoint, config.teacher.random_init = "", True
    run = build.build_run(config, make_mesh(), input_size=(args.height, args.width))
    size = (args.height, args.width)
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}, {os.cpu_count()} cores); jax "
          f"{jax.__version__}; torch {torch.__version__} ({torch.get_num_threads()} threads); case {args.case}, "
          f"{args.batch} x {size[0]}x{size[1]}; float32; load average before: {os.getloadavg()[0]:.1f}\n")
    t0 = time.perf_counter()
    print(table("student", network_convs(run.student, size, args.batch), True, args.repeats), "\n", flush=True)
    if not args.no_teacher:
        print(table("teacher (its part of the step)", teacher_step_convs(run, size, args.batch), False, args.repeats),
              "\n", flush=True)
    print(f"{time.perf_counter() - t0:.0f} s; load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main(sys.argv[1:])
