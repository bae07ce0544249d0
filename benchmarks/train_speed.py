"""The train step: what distillation costs per step, the same step in PyTorch, and accelerator figures.

Each case is one of our configs, built exactly as `train.py` builds it (networks,
connector, loss, optimizer, sharded state, the jitted and donated step), fed
random batches of the config's global batch so the input pipeline is not
measured:

  demo        configs/demo.py: FCN R18-d8 w16 -> w8 on 64x64 synthetic scenes, batch 16
  dlv3        configs/cityscapes.py: DeepLabV3 R101-d8 -> R18-d8, 512x1024 crops, batch 8
  pspnet      configs/cityscapes.py:head=pspnet: PSPNet R101-d8 -> R18-d8, likewise
  det_demo    configs/detection_demo.py: FCOS R18 w8 students on 128x128 synthetic scenes, batch 8
  retinanet   configs/coco.py: RetinaNet R101 trunk -> RetinaNet R50, distilled on P3-P6 (four loss modules),
              800x1344 (the landscape bucket of 1333x800) x 2 per device
  fcos        configs/coco.py:detector=fcos: FCOS R101-caffe trunk -> FCOS R50-caffe, likewise

For each: the student alone (task loss only); the student distilled with the
loss (teacher forward in inference mode + connector + loss + the task); the
student distilled with FitNet (the same teacher forward and connector, then a
plain MSE), so the loss's own cost shows; and the same distillation step in
PyTorch, eager: the project's PyTorch formulations of the networks
(`tests/torch_models_reference.py`) and of the loss (`tests/torch_reference.py`,
the authors' literal order), the same shapes, the config's optimizer (SGD with
momentum and weight decay; the demo's AdamW), the teacher's backbone in eval
mode under `no_grad` (what our step computes of it: XLA drops the unused
heads), as many threads as the machine has cores (segmentation cases only: the
detection cases have no PyTorch column). On a CPU backend the Cityscapes cases
shrink to 128x256 crops and batch 2, the COCO ones to 256x384 and batch 2 (said
in the table); detection batches carry random boxes (6 per image, up to 16);
`--height/--width/--batch` set them anywhere (full size: `--height 512 --width
1024 --batch 8`). Teachers are randomly initialised (speed does not depend on
the weights).

`--eval` adds, for the detection cases, the evaluation side: the jitted
post-processing alone (per-level top-1000 of logits drawn so that most pairs
pass the 0.05 threshold, as a trained detector's do, decode, class-aware NMS,
the best 100) in images/s; the evaluator's jitted function (the student's
inference forward + post-processing); and the host side, collecting 100
detections per image and pycocotools' COCOeval against a ground truth of 7
objects per image (COCO val2017's average), in images/s.

Every measurement runs in its own process, one after the other: the first step
(compilation) is reported separately, then `--steps` steps, each waited for;
the time of a step is the median.

The loss's own cost is (step with it) - (step with FitNet), and its FLOPs the
same difference of XLA's cost analysis of the two compiled steps; `--matmul`
adds the machine's float32 matmul rate and what the loss's FLOPs would cost at it.

    python benchmarks/train_speed.py                          # every case, JAX and PyTorch
    python benchmarks/train_speed.py --cases dlv3 --steps 10 --matmul
    python benchmarks/train_speed.py --cases dlv3 --height 512 --width 1024 --batch 8   # full size
    python benchmarks/train_speed.py --cases det_demo retinanet fcos --eval
    python benchmarks/train_speed.py --cases retinanet fcos --height 800 --width 1344 --batch 2   # one GPU
    python benchmarks/train_speed.py --report --json report.json   # figures of this device (below)
    python benchmarks/train_speed.py --report --height 64 --width 128 --batch 1 --steps 2   # a quick check on CPU

`--report` measures, on whatever device it runs: the paper's Cityscapes step
(dlv3, 512x1024, 8 images per device on an accelerator) and the demo step, each
in bfloat16 and float32 (`--dtypes`), printing per case the step time,
images/s, the step's FLOPs from XLA's cost analysis, the achieved TFLOP/s, the
fraction of the device's dense bfloat16 peak (`cankd_jax.timing.PEAK_BF16_TFLOPS`,
by `device_kind`) and the peak memory; `--json PATH` writes the same figures. It
imports no data pipeline (Grain, TFDS) or logging library: JAX, Flax, Optax,
chex, Orbax, NumPy and ml_collections.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # this checkout's cankd_jax, installed or not
    sys.path.insert(0, ROOT)
from cankd_jax.compute import CONV_FORMS, DILATED_CONV  # noqa: E402 - after the path; imports JAX but starts no backend
from arg_types import count, positive  # this folder's command-line value types  # noqa: E402
CONFIGS = os.path.join(ROOT, "configs")
# case -> (config file, argument, phases of a comparison config: (without, with) the distillation loss)
CASES = {
    "demo": ("demo.py", "loss={loss}", ("student", "{loss}")),
    "dlv3": ("cityscapes.py", "head=deeplabv3,loss={loss}", None),
    "pspnet": ("cityscapes.py", "head=pspnet,loss={loss}", None),
    "det_demo": ("detection_demo.py", "loss={loss}", ("student", "{loss}")),
    "retinanet": ("coco.py", "detector=retinanet,teacher=retinanet_r101,loss={loss}", None),
    "fcos": ("coco.py", "detector=fcos,teacher=fcos_r101,loss={loss}", None),
}
DETECTION = ("det_demo", "retinanet", "fcos")
VARIANTS = ("alone", "loss", "fitnet")
REPORT_CASES = ("dlv3", "demo")
REPORT_IMAGES_PER_DEVICE = 8  # --report's Cityscapes batch on an accelerator, per device
REPORT_STEPS = 20  # --report's timed steps on an accelerator

# --- JAX -----------------------------------------------------------------------------------------------------


def case_configs(case: str, loss: str):
    """(config without, config with) the distillation loss."""
    from cankd_jax.config_arg import load_config
    from cankd_jax.train.runner import phase_config

    file, arg, phases = CASES[case]
    config = load_config(os.path.join(CONFIGS, file), arg.format(loss=loss))
    if phases:
        return tuple(phase_config(config, p.format(loss=loss), "/nonexistent") for p in phases)
    without = config.copy_and_resolve_references()
    without.distill = []
    return without, config


def case_config(case: str, variant: str, loss: str):
    if variant == "fitnet":
        return case_configs(case, "fitnet")[1]
    return case_configs(case, loss)[0 if variant == "alone" else 1]


def case_shape(case: str, cpu: bool, args) -> tuple[tuple[int, int], int]:
    """((h, w), global batch) of a case on this backend."""
    import jax

    without = case_configs(case, "cankd")[0]
    if case == "demo":
        return (without.data.image_size,) * 2, without.batch_size
    if case in DETECTION:
        from cankd_jax.data.detection import bucket_shapes

        if case == "det_demo":
            return bucket_shapes(without.data.scale)[0], without.batch_size
        size = (256, 384) if cpu else bucket_shapes(without.data.scale)[0]
        return (args.height or size[0], args.width or size[1]), args.batch or (2 if cpu else 2 * jax.device_count())
    size = (128, 256) if cpu else tuple(without.data.crop_size)
    return (args.height or size[0], args.width or size[1]), args.batch or (2 if cpu else without.batch_size)


# --- PyTorch ---------------------------------------------------------------------------------------------------


def _torch_network(cfg, num_classes: int):
    """Our network config block as the PyTorch reference network (mmseg's EncoderDecoder on a ResNet-d8),
    and the channels of its backbone's features."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import torch_models_reference as ref

    from cankd_jax import models

    backbone = models.make_network(dict(name=cfg["backbone"], backbone_kwargs=cfg.get("backbone_kwargs") or {}), num_classes=None)
    if not isinstance(backbone, models.ResNet):
        raise ValueError(f"the PyTorch step covers ResNet backbones, not {cfg['backbone']!r}")
    bb = ref.ResNet(backbone.depth, stem_width=backbone.stem_width, base_width=backbone.base_width,
                    deep_stem=backbone.deep_stem, strides=backbone.strides, dilations=backbone.dilations,
                    stage_blocks=backbone.stage_blocks)
    ch = backbone.feature_channels()
    channels = cfg.get("head_channels") or ch["layer4"] // 4
    heads = {"fcn": lambda: ref.FCNHead(ch["layer4"], channels, num_classes),
             "deeplabv3": lambda: ref.ASPPHead(ch["layer4"], channels, num_classes),
             "pspnet": lambda: ref.PSPHead(ch["layer4"], channels, num_classes)}
    aux = ref.FCNHead(ch["layer3"], ch["layer3"] // 4, num_classes, num_convs=1, concat_input=False)
    return ref.EncoderDecoder(bb, heads[cfg["name"]](), aux), ch


def time_torch(config, size, batch, steps: int, threads: int, channels_last: bool = False, profile: str = "") -> dict:
    """Median time of the same distillation step in PyTorch, eager (see the module docstring); with `profile`, a
    JSON file there of each aten op's self CPU time over the timed steps (`torch.profiler`), in ms per step."""
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import torch_reference as lref

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    k = config.task.num_classes
    student, s_ch = _torch_network(config.student.to_dict(), k)
    student.train()
    teacher = None
    terms = []
    params = list(student.parameters())
    for d in config.get("distill", ()):
        d = dict(d.to_dict() if hasattr(d, "to_dict") else d)
        teacher = teacher or _torch_network(config.teacher.to_dict(), k)[0].backbone.eval()
        opts = dict(d.get("options") or {})
        conn = int(d.get("connector") or 0)
        connector = torch.nn.Conv2d(s_ch[d["student_feature"]], conn, 1) if conn else torch.nn.Identity()
        if d["loss"] == "cankd":
            loss = lref.CanKDLoss(opts.pop("in_channels"), **opts).train()
        elif d["loss"] == "fitnet":
            loss = lambda s, t, o=opts: lref.l2_loss(s, t, **o)  # noqa: E731
        else:
            raise ValueError(f"the PyTorch step covers cankd and fitnet, not {d['loss']!r}")
        terms.append((d["student_feature"], d["teacher_feature"], connector, loss, float(d.get("weight", 1.0))))
        params += list(connector.parameters()) + (list(loss.parameters()) if isinstance(loss, torch.nn.Module) else [])
    opt_cfg = config.optimizer
    if opt_cfg.name == "sgd":
        opt = torch.optim.SGD(params, lr=opt_cfg.lr, momentum=opt_cfg.momentum, weight_decay=opt_cfg.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=opt_cfg.lr, betas=(opt_cfg.get("b1", 0.9), opt_cfg.get("b2", 0.999)),
                                weight_decay=opt_cfg.weight_decay)
    cw = config.task.get("class_weight")
    weight = torch.tensor(cw, dtype=torch.float32) if cw else None
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if channels_last:
        student = student.to(memory_format=fmt)
        teacher = teacher.to(memory_format=fmt) if teacher is not None else None
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, *size, generator=g).contiguous(memory_format=fmt)
    labels = torch.randint(0, k, (batch, *size), generator=g)

    def ce(logits):  # mmseg: per-pixel loss (ignore 255, class weights), mean over every pixel
        return F.cross_entropy(logits, labels, weight=weight, ignore_index=255, reduction="none").mean()

    def step():
        opt.zero_grad(set_to_none=True)
        t_feats = {}
        if teacher is not None:
            with torch.no_grad():
                t_out = teacher(images)
            t_feats = {t: t_out[t] for _, t, *_ in terms}
        out = student(images)
        total = ce(out["logits"]) + config.task.aux_weight * ce(out["aux_logits"])
        for s_name, t_name, connector, loss, w in terms:
            total = total + w * loss(connector(out[s_name]), t_feats[t_name])
        total.backward()
        opt.step()
        return float(total.detach())

    step()
    times = []
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if profile else None
    with prof or contextlib.nullcontext():
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    if prof is not None:
        ops = {e.key: {"ms": e.self_cpu_time_total / 1e3 / steps, "calls": e.count / steps}
               for e in prof.key_averages() if e.self_cpu_time_total > 0}
        with open(profile, "w") as f:
            json.dump(ops, f, indent=1)
    return {"sec": statistics.median(times), "times": times, "threads": threads, "torch": torch.__version__}


# --- processes -------------------------------------------------------------------------------------------------


def worker(args) -> dict:
    from cankd_jax.compute import conv_form, dilated_conv

    # The forms every network is traced in, in this process.
    with dilated_conv(args.dilated_conv), conv_form(args.conv_form):
        return _work(args)


def _work(args) -> dict:
    import jax

    from cankd_jax.timing import eval_speed, lowered_flops, matmul_rate, time_loss_alone, time_step
    from cankd_jax.train.sharding import make_mesh

    # The state init compiles far sooner on CPU with rbg than with threefry; speed does not depend on the values.
    jax.config.update("jax_default_prng_impl", "rbg")
    if args.worker == "matmul":
        return matmul_rate()
    cpu = jax.default_backend() == "cpu"
    case = args.cases[0]
    size, batch = case_shape(case, cpu, args)
    config = case_config(case, args.variant, args.loss)
    config.dtype, config.remat = args.dtype or "float32", args.remat
    steps = args.steps or (50 if not cpu else 20 if case in ("demo", "det_demo") else 5)
    if args.worker == "eval":
        return eval_speed(config, make_mesh(), size, batch)
    if args.worker == "torch":
        return time_torch(config, size, batch, steps, args.threads, args.channels_last, args.profile)
    if args.worker == "flops":
        return lowered_flops(config, size, batch)
    if args.worker == "loss_alone":
        return time_loss_alone(config, size, batch, max(steps, 5))
    return time_step(config, size, batch, steps, profile=args.profile, hlo=args.hlo)


def spawn(kind: str, case: str, variant: str, args, timeout: float | None = None) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--cases", case, "--variant", variant,
           "--loss", args.loss, "--remat", args.remat, "--threads", str(args.threads),
           "--dilated-conv", args.dilated_conv, "--conv-form", args.conv_form]
    for flag in ("steps", "height", "width", "batch", "dtype", "profile", "hlo"):
        if getattr(args, flag, None):
            cmd += [f"--{flag}", str(getattr(args, flag))]
    cmd += ["--channels-last"] if args.channels_last else []
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=_ENV, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"over {timeout:.0f} s (--timeout)"}
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        # A compiler abort prints its check (`Check failed: ...`) above a stack trace: name the check.
        cause = [ln for ln in lines if "Check failed" in ln or "Error" in ln][-1:] or lines[-1:] or ["killed"]
        return {"error": f"exit {proc.returncode}: {cause[0].strip()[:300]}"}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["load"] = os.getloadavg()[0]
    return out


# Workers share a compilation cache, so a case measured in several rounds compiles once.
_ENV = dict(os.environ)


def _merge(rounds: list[dict]) -> dict:
    """One measurement from several rounds: every step time pooled, the median of them; the first compile."""
    ok = [r for r in rounds if "sec" in r]
    if not ok:
        return rounds[0]
    out = dict(ok[0])
    out["times"] = [t for r in ok for t in r["times"]]
    out["sec"] = statistics.median(out["times"])
    out["loads"] = [r.get("load") for r in ok]
    return out


def _ms(r: dict) -> str:
    return f"{1e3 * r['sec']:.0f}" if "sec" in r else r["error"]


def compare(args) -> None:
    import jax

    cpu = jax.default_backend() == "cpu"
    print(f"device: {jax.device_count()} x {jax.devices()[0].device_kind} ({jax.default_backend()}, "
          f"{os.cpu_count()} cores); jax {jax.__version__}; loss: {args.loss}; dtype: {args.dtype or 'float32'}; "
          f"remat: {args.remat}; convolutions: {args.conv_form}, dilated: {args.dilated_conv}; "
          f"load average before: {os.getloadavg()[0]:.1f}\n", flush=True)
    rate = _merge([spawn("matmul", args.cases[0], "alone", args) for _ in range(args.rounds)]) if args.matmul else None
    if rate and "sec" in rate:
        rate["gflops"] = 2 * rate["n"] ** 3 / rate["sec"] / 1e9
    if rate and "gflops" in rate:
        print(f"float32 matmul rate (XLA, {rate['n']}^3, median of 10): {rate['gflops']:.0f} GFLOP/s\n", flush=True)
    if "JAX_COMPILATION_CACHE_DIR" not in _ENV:
        import tempfile

        _ENV["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="cankd_train_speed_cache_")
        _ENV.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
    rows = []
    for case in args.cases:
        size, batch = case_shape(case, cpu, args)
        # Rounds alternate the frameworks, so a change in the machine's load falls on both.
        torch = not args.no_torch and case not in DETECTION  # no PyTorch formulation of the detectors' step
        kinds = [("jax", v) for v in VARIANTS] + ([("torch", "loss"), ("torch", "alone")] if torch else [])
        if args.eval and case in DETECTION:
            kinds.append(("eval", "alone"))
        if args.matmul and args.loss in ("cankd", "nonlocal_self"):
            kinds.append(("loss_alone", "loss"))
        samples: dict = {k: [] for k in kinds}
        for i in range(args.rounds):
            for kind, variant in kinds:
                samples[(kind, variant)].append(spawn(kind, case, variant, args))
            print(f"  measured {case}, round {i + 1} (load average {os.getloadavg()[0]:.1f})", file=sys.stderr,
                  flush=True)
        r = {v: _merge(samples[("jax", v)]) for v in VARIANTS}
        r["torch"] = _merge(samples[("torch", "loss")]) if torch else {"error": "-"}
        r["torch_alone"] = _merge(samples[("torch", "alone")]) if torch else {"error": "-"}
        if ("eval", "alone") in samples:
            r["eval"] = samples[("eval", "alone")][0]
        if ("loss_alone", "loss") in samples:
            r["loss_alone"] = _merge(samples[("loss_alone", "loss")])
        rows.append((case, size, batch, r))
    L = args.loss
    rows_extra: list[str] = []
    print(f"| case | input | batch | JAX alone ms | JAX + {L} ms | JAX + fitnet ms | {L}'s own ms | {L}'s own GFLOP | "
          f"PyTorch alone ms | PyTorch + {L} ms | PyTorch / JAX (+ {L}) | compile s (alone / + {L}) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for case, size, batch, r in rows:
        a, b, f, t = r["alone"], r["loss"], r["fitnet"], r["torch"]
        own = f"{1e3 * (b['sec'] - f['sec']):+.0f}" if "sec" in b and "sec" in f else "-"
        own_gf = f"{(b['flops'] - f['flops']) / 1e9:.1f}" if "sec" in b and "sec" in f else "-"
        ratio = f"**{t['sec'] / b['sec']:.2f}x**" if "sec" in t and "sec" in b else "-"
        comp = f"{a.get('compile_s', 0):.0f} / {b.get('compile_s', 0):.0f}"
        print(f"| {case} | {size[0]}x{size[1]} | {batch} | {_ms(a)} | {_ms(b)} | {_ms(f)} | {own} | {own_gf} | "
              f"{_ms(r['torch_alone'])} | {_ms(t)} | {ratio} | {comp} |")
        if rate and "gflops" in rate and "sec" in b and "sec" in f:
            flops = b["flops"] - f["flops"]
            predicted = flops / (rate["gflops"] * 1e9)
            alone = r.get("loss_alone", {})
            line = (f"{L}'s own cost / what its FLOPs cost at {rate['gflops']:.0f} GFLOP/s: in the step "
                    f"{1e3 * (b['sec'] - f['sec']):.0f} / {1e3 * predicted:.0f} ms = {(b['sec'] - f['sec']) / predicted:.2f}x")
            if "sec" in alone:
                p_alone = alone["flops"] / (rate["gflops"] * 1e9)
                line += (f"; alone ({'x'.join(map(str, alone['shape']))}, {alone['flops'] / 1e9:.1f} GFLOP) "
                         f"{1e3 * alone['sec']:.0f} / {1e3 * p_alone:.0f} ms = {alone['sec'] / p_alone:.2f}x")
            rows_extra.append(f"- {case}: {line}")
    if rows_extra:
        print("\n" + "\n".join(rows_extra))
    evals = [(case, size, batch, r["eval"]) for case, size, batch, r in rows if "eval" in r]
    if evals:
        print("\n| case | input | batch | post-processing images/s | forward + post-processing images/s | "
              "COCOeval (collect + evaluate) images/s | compile s (post-processing / forward) |")
        print("|---|---|---|---|---|---|---|")
        for case, size, batch, e in evals:
            if "error" in e:
                print(f"| {case} | {size[0]}x{size[1]} | {batch} | {e['error']} ||||")
                continue
            print(f"| {case} | {size[0]}x{size[1]} | {batch} | {e['post_images_per_s']:.1f} | "
                  f"{e['forward_images_per_s']:.1f} | {e['coco_images_per_s']:.0f} | "
                  f"{e['post_compile_s']:.0f} / {e['forward_compile_s']:.0f} |", flush=True)
    print(f"\nms: median step time; PyTorch / JAX: how many times faster the JAX step is (eager PyTorch "
          f"{rows[0][3]['torch'].get('torch', '')}, {args.threads} threads"
          f"{', channels_last' if args.channels_last else ''}); {L}'s own: the step with {L} minus the step with FitNet "
          f"(same teacher and connector).")
    loads = [x for _, _, _, r in rows for m in r.values() for x in m.get("loads", [])]
    if loads:
        print(f"1-minute load average when each measurement ended: {min(loads):.1f} to {max(loads):.1f} "
              f"({os.cpu_count()} cores; other users' jobs included)")


def report_rows(args) -> list[dict]:
    """The `--report` cases on this device: each (case, dtype) in its own process, one after the other."""
    import jax

    from cankd_jax.timing import PROFILE_STEPS, peak_bf16

    cpu = jax.default_backend() == "cpu"
    rows = []
    for case in args.cases:
        for dtype in args.dtypes:
            size, batch = case_shape(case, cpu, args)
            if not cpu and args.batch is None and case != "demo":
                batch = args.images_per_device * jax.device_count()
            one = argparse.Namespace(**{**vars(args), "dtype": dtype, "batch": batch, "height": size[0],
                                        "width": size[1]})
            if case == "demo":  # the demo's own size and batch
                one.batch = one.height = one.width = None
            one.steps = args.steps or (None if cpu else REPORT_STEPS)
            tag = f"{case}_{dtype}_{batch}"
            if args.profile:
                os.makedirs(args.profile, exist_ok=True)
                one.profile = os.path.join(args.profile, tag)
                one.hlo = os.path.join(args.profile, f"{tag}.hlo.txt.gz")
            t0 = time.perf_counter()
            r = spawn("jax", case, "loss", one, timeout=args.timeout)
            row = {"case": case, "loss": args.loss, "dtype": dtype, "remat": args.remat, "input": list(size),
                   "batch": batch, "wall_s": time.perf_counter() - t0, **r}
            if args.profile and "sec" in r:
                row["profile"] = _summarize_profile(one.profile, os.path.join(args.profile, f"{tag}.ops.md"),
                                                    steps=PROFILE_STEPS)
            row.pop("times", None) if "error" in r else None
            if "sec" in r:
                n = r["devices"]
                row["images_per_s"] = batch / r["sec"]
                row["tflops_per_device"] = r["flops"] / r["sec"] / 1e12  # cost analysis: the per-device program
                peak, source = peak_bf16(r["device_kind"])
                row["bf16_peak_tflops"], row["peak_source"] = peak, source
                row["fraction_of_bf16_peak"] = row["tflops_per_device"] / peak if peak else None
                row["images_per_device"] = batch // n
            rows.append(row)
            print_report_row(row, header=len(rows) == 1)
            if args.json:  # written after every case, so a run cut short keeps what it measured
                with open(args.json, "w") as f:
                    json.dump({"jax": jax.__version__, "backend": jax.default_backend(),
                               "devices": [str(d.device_kind) for d in jax.devices()], "rows": rows}, f, indent=1)
    return rows


def _summarize_profile(folder: str, out_md: str, steps: int) -> dict:
    """The per-op summary of the trace under `folder` written to `out_md` (and the trace copied beside it);
    returns the summary's totals, or the error that stopped it (a summary must not lose the row)."""
    import glob
    import shutil

    try:
        from trace_summary import summarize, to_markdown

        (path,) = glob.glob(os.path.join(folder, "**", "perfetto_trace.json.gz"), recursive=True)
        shutil.copy(path, out_md.replace(".ops.md", ".trace.json.gz"))
        summary = summarize(path, steps=steps)
        with open(out_md, "w") as f:
            f.write(to_markdown(summary))
        return summary["totals"]
    except Exception as e:  # noqa: BLE001 - reported in the row, the measurement stands
        return {"error": f"{type(e).__name__}: {e}"}


def print_report_row(row: dict, header: bool) -> None:
    if header:
        print("| device | case | input | images (per device) | dtype | step ms | images/s | step TFLOP (XLA) | "
              "achieved TFLOP/s per device | of bf16 peak | peak memory per device GB (XLA / allocator) | compile s |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    what = f"{row['case']} + {row['loss']}"
    shape = f"{row['input'][0]}x{row['input'][1]}"
    if "sec" not in row:
        print(f"| - | {what} | {shape} | {row['batch']} | {row['dtype']} | {row['error']} |||||||", flush=True)
        return
    frac = (f"{100 * row['fraction_of_bf16_peak']:.1f}% of {row['bf16_peak_tflops']:.0f}"
            if row["fraction_of_bf16_peak"] is not None else "- (no peak known)")
    mem = f"{row['peak_bytes'] / 1e9:.2f}"
    mem += f" / {row['device_peak_bytes'] / 1e9:.2f}" if row.get("device_peak_bytes") else " / -"
    print(f"| {row['devices']} x {row['device_kind']} | {what} | {shape} | {row['batch']} ({row['images_per_device']}) | "
          f"{row['dtype']} | {1e3 * row['sec']:.1f} | {row['images_per_s']:.1f} | {row['flops'] / 1e12:.3f} | "
          f"{row['tflops_per_device']:.2f} | {frac} | {mem} | {row['compile_s']:.0f} |", flush=True)


def report(args) -> None:
    """Step time, images/s, FLOPs, achieved TFLOP/s and fraction of bf16 peak, peak memory, for this device."""
    import jax

    d = jax.devices()[0]
    print(f"train_speed.py --report: {jax.device_count()} x {d.device_kind} ({jax.default_backend()}); "
          f"jax {jax.__version__}; remat: {args.remat}; teachers randomly initialised; random batches (no input "
          f"pipeline)\n", flush=True)
    rows = report_rows(args)
    peaks = {r["peak_source"] for r in rows if r.get("peak_source")}
    print(f"\nstep ms: median of {args.steps or REPORT_STEPS} steps after compilation and one warm-up step, each "
          f"waited for; FLOPs: XLA's cost analysis of the compiled per-device step (forward, backward, optimizer); "
          f"achieved = FLOPs / step time; bf16 peak (dense): {'; '.join(sorted(peaks)) or '-'} (float32 rows too, "
          f"against the bfloat16 peak); memory: XLA's buffer assignment (arguments + outputs - donated + "
          f"temporaries) and the device allocator's peak bytes in use where the backend reports it.")
    if args.json:
        print(f"written: {args.json}")
    if any("error" in r for r in rows):
        sys.exit(1)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", nargs="+", default=None, choices=list(CASES),
                    help=f"default: all; --report: {' '.join(REPORT_CASES)}")
    ap.add_argument("--loss", default="cankd", help="distillation loss (a preset name; PyTorch: cankd or fitnet)")
    ap.add_argument("--steps", type=count(1), default=None,
                    help="timed steps (default on CPU: 20 for demo, else 5; 50 on accelerators)")
    ap.add_argument("--height", type=count(1), default=None)
    ap.add_argument("--width", type=count(1), default=None)
    ap.add_argument("--batch", type=count(1), default=None, help="global batch of the Cityscapes and COCO cases")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="config.dtype (default float32)")
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=["float32", "bfloat16"],
                    help="--report: the compute dtypes to measure")
    ap.add_argument("--json", default="", help="--report: also write the figures to this JSON file")
    ap.add_argument("--images-per-device", type=count(1), default=REPORT_IMAGES_PER_DEVICE,
                    help="--report on an accelerator: the batch per device of the Cityscapes and COCO cases")
    ap.add_argument("--timeout", type=positive, default=600, help="--report: seconds one case may take")
    ap.add_argument("--remat", default="none", help="config.remat policy")
    ap.add_argument("--dilated-conv", default="auto", choices=list(DILATED_CONV),
                    help="how dilated convolutions are computed (cankd_jax.compute.dilated_conv)")
    ap.add_argument("--conv-form", default="auto", choices=CONV_FORMS,
                    help="how the other k x k convolutions are computed (cankd_jax.compute.conv_form)")
    ap.add_argument("--threads", type=count(1), default=os.cpu_count() or 1, help="PyTorch intra-op threads")
    ap.add_argument("--channels-last", action="store_true", help="PyTorch in channels_last memory format")
    ap.add_argument("--no-torch", action="store_true", help="JAX columns only")
    ap.add_argument("--matmul", action="store_true", help="also measure the float32 matmul rate")
    ap.add_argument("--rounds", type=count(1), default=1,
                    help="measure every column this many times, alternating frameworks; step times are pooled")
    ap.add_argument("--eval", action="store_true", help="also time detection post-processing and COCO evaluation")
    ap.add_argument("--report", action="store_true",
                    help="figures of this device: step time, images/s, FLOPs, TFLOP/s, fraction of bf16 peak, memory")
    ap.add_argument("--profile", default="", help="--report: a folder for a profiler trace of each case's step "
                    "(one subfolder per case and dtype) and its per-op summary")
    ap.add_argument("--hlo", default="", help=argparse.SUPPRESS)
    ap.add_argument("--worker", choices=["jax", "torch", "matmul", "loss_alone", "eval", "flops"], help=argparse.SUPPRESS)
    ap.add_argument("--variant", choices=VARIANTS, default="loss", help=argparse.SUPPRESS)
    return ap


def main(argv: list[str]) -> None:
    args = parser().parse_args(argv)
    if args.cases is None:
        args.cases = list(REPORT_CASES) if args.report else list(CASES)
    if args.worker:
        print(json.dumps(worker(args)))
    elif args.report:
        report(args)
    else:
        compare(args)


if __name__ == "__main__":
    main(sys.argv[1:])
