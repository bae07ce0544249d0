"""Pod rehearsal: a config's real train step compiled for 8, 64, 256 ... devices on this machine, before anyone rents them.

    python -m cankd_jax.rehearse --config configs/coco.py:detector=retinanet --devices 8 64 256 [--fsdp]
    python -m cankd_jax.rehearse --config configs/cityscapes.py --devices 8 64 256 --layouts replicated fsdp \\
        --per-device-batch 2 --markdown results/rehearsal/cityscapes.md [--config.dtype=bfloat16 ...]

For each device count a worker process fakes that many CPU devices
(`--xla_force_host_platform_device_count`), builds the step exactly as `train.py` does (`cankd_jax.train.aot`:
networks, distillation terms, optimizer, the state's layout, the jitted and donated step over a `data` mesh) for
the configured global batch (or `--per-device-batch` times the devices), and compiles it without running it:
nothing is initialised and no weights or data are read. Per device it reports

- memory: the state's parameters, optimizer state and statistics and the teacher's variables (from their
  shardings), XLA's temporaries and the peak (arguments + outputs - donated + temporaries) of the compiled
  program's buffer assignment;
- communication: every collective of the partitioned program (`compiled.as_text()`), its payload and the bytes
  each device sends for it on a ring (all-reduce 2(g-1)/g of the payload, all-gather and reduce-scatter (g-1)/g
  of the gathered size), grouped as gradient all-reduces (replicated parameters), gradient reduce-scatters
  (FSDP-spread parameters: XLA:CPU writes them as an all-reduce and a slice, which XLA's GPU and TPU compilers
  turn into a reduce-scatter, so they are counted as one), parameter all-gathers (FSDP) and the small
  all-reduces of BatchNorm statistics, loss normalisers and norms;
- a step-time model: the per-device program's FLOPs (XLA's cost analysis) at an assumed achieved rate, plus the
  ring bytes at an assumed per-device bandwidth and a fixed latency per collective; printed with both bounds
  (no overlap, full overlap) and its assumptions.

Mistakes that would otherwise surface on the pod are one-line errors naming the fix: a global batch the devices
do not divide; a state that would leave the step in another shape, dtype or layout than it entered (every step
would compile again); a host callback inside the step; and, under FSDP, arrays that stay whole on every device
because the device count divides none of their axes (a warning; an error with `--strict`).

Caveat: the buffer assignment and the collectives are XLA:CPU's. An accelerator's compiler fuses and schedules
differently (and combines small collectives into fewer launches), so memory is an estimate (see
`benchmarks/memory.py`), while the payload bytes, which follow from the shardings, carry over.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import re
import subprocess
import sys
import time
from typing import Any, Optional

GB, MB = 1e9, 1e6
RESULT_PREFIX = "REHEARSAL_RESULT "
# Bytes per element of the HLO element types a collective can carry.
ITEMSIZE = {"f64": 8, "s64": 8, "u64": 8, "c64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s16": 2,
            "u16": 2, "s8": 1, "u8": 1, "pred": 1, "f8e4m3fn": 1, "f8e5m2": 1}
KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
CATEGORIES = ("gradient all-reduce", "gradient reduce-scatter", "parameter all-gather", "statistics all-reduce",
              "other")
DEVICE_GB = 16.0  # the device size the report checks the peak against (--device-gb)


# ----------------------------------------------------------------------------------------------- reading the program

_INSTR = re.compile(r"^\s*(?:ROOT )?%?(?P<name>[\w.\-]+) = (?P<shape>.+?) (?P<op>"
                    + "|".join(KINDS) + r")(?P<start>-start)?\((?P<rest>.*)$")
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+(?:fn)?)?)\[([\d,]*)\]")


def _arrays(shape: str) -> list[tuple[str, int]]:
    """`(dtype, elements)` of each array in an HLO shape (an array or a tuple of them)."""
    return [(t, math.prod(int(d) for d in dims.split(",") if d)) for t, dims in _ARRAY.findall(shape)
            if t in ITEMSIZE]


def _group_size(rest: str, n_devices: int) -> int:
    """Devices in each replica group of a collective (its `replica_groups` in any of XLA's three spellings)."""
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", rest)
    if m:
        sizes = dict(re.findall(r"'(\w+)'=(\d+)", m.group(1)))
        return math.prod(int(sizes[a]) for a in re.findall(r"'(\w+)'", m.group(2)))
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", rest)
    if m:
        return int(m.group(2))
    m = re.search(r"replica_groups=\{\{([\d,]*)\}", rest)
    if m:
        return len(m.group(1).split(","))
    return n_devices  # `{}`: one group of every device


def collectives(hlo_text: str, n_devices: int) -> list[dict[str, Any]]:
    """Every collective of a compiled program: kind, arrays `(dtype, elements, the JAX op it came from)`, group
    size, the instruction's op name, and how often it runs per step (a while loop's known trip count, else once; `in_loop` marks those in a
    loop whose count XLA does not know)."""
    trips: dict[str, tuple[int, bool]] = {}  # while-body computation -> (trip count, known)
    for m in re.finditer(r"while\(.*?body=%?([\w.\-]+)(.*)$", hlo_text, re.M):
        n = re.search(r'"known_trip_count":\{"n":"(\d+)"', m.group(2))
        trips[m.group(1)] = (int(n.group(1)), True) if n else (1, False)
    # A combined (tuple) collective carries one op_name for all its parts; each part's own is on the
    # get-tuple-element that reads it.
    parts = {(m.group(1), int(m.group(2))): m.group(3) for m in re.finditer(
        r'get-tuple-element\(%?([\w.\-]+)\), index=(\d+), metadata=\{op_name="([^"]*)"', hlo_text)}
    out, computation = [], ""
    for line in hlo_text.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if head and not line.startswith(" "):
            computation = head.group(1)
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        arrays = _arrays(m.group("shape"))
        if m.group("start") and m.group("op") in ("all-gather", "collective-permute") and len(arrays) > 1:
            arrays = arrays[len(arrays) // 2:]  # an async start's shape is (operands, results): keep the results
        op_name = re.search(r'op_name="([^"]*)"', m.group("rest"))
        count, known = trips.get(computation, (1, True))
        op_name = op_name.group(1) if op_name else ""
        names = [parts.get((m.group("name"), i), op_name) for i in range(len(arrays))] if len(arrays) > 1 \
            else [op_name]
        out.append({"kind": m.group("op"), "arrays": [(d, n, o) for (d, n), o in zip(arrays, names)],
                    "group": _group_size(m.group("rest"), n_devices), "op_name": op_name, "count": count,
                    "in_loop": not known})
    return out


def _phase(op_name: str) -> str:
    if "transpose(" in op_name:
        return "backward"
    return "forward" if "jvp(" in op_name else "update"


def _names_module(op_name: str, modules: tuple[str, ...]) -> bool:
    """Whether `modules` (a parameter's enclosing module names) appear in order among `op_name`'s components."""
    parts = iter(op_name.split("/"))
    return all(any(m == p for p in parts) for m in modules)


def traffic(colls: list[dict[str, Any]], params: list[tuple[int, bool, tuple[str, ...]]]) -> dict[str, Any]:
    """Collectives by category: `ops` (launches per step), `payload` bytes, `sent` bytes per device on a ring.

    `params`: `(elements, spread, path)` of each trained parameter. A backward all-reduce of a parameter's size
    inside that parameter's module (its two innermost module names in the op's name, else the innermost) is a
    gradient reduction: an all-reduce, or for a spread (FSDP) parameter a reduce-scatter on accelerators. A
    parameter used several times (RetinaNet's head, shared by the pyramid levels) may have one per use.
    `unmatched parameters` lists those with none: frozen ones (no gradient), and ones whose gradient XLA reduces
    as a product before their last matmul (CanKD's theta and phi: a C x C matrix), which counts under statistics.
    """
    by_size = collections.defaultdict(list)
    for n, is_spread, path in params:
        by_size[n].append((path, is_spread))
    matched: collections.Counter = collections.Counter()

    def gradient_of(n: int, op_name: str):
        candidates = by_size.get(n, [])
        for depth in (2, 1):
            hits = [c for c in candidates if len(c[0]) > depth and _names_module(op_name, c[0][-1 - depth:-1])]
            fresh = [c for c in hits if c[0] not in matched]
            # A second reduction for the same parameter is a weight gradient's (a contraction's) only: BatchNorm
            # reduces its own statistics' gradients at the size of its scale and bias too.
            if not fresh and op_name.rsplit("/", 1)[-1] not in ("conv_general_dilated", "dot_general"):
                continue
            if hits:
                hit = (fresh or hits)[0]
                matched[hit[0]] += 1
                return hit
        return None

    out: dict[str, Any] = {c: {"ops": 0, "payload": 0.0, "sent": 0.0} for c in CATEGORIES}
    repeated_bytes = 0.0
    for c in colls:
        g, k = c["group"], c["count"]
        touched = set()
        for dtype, n, op_name in c["arrays"]:
            nbytes = n * ITEMSIZE[dtype]
            hit = gradient_of(n, op_name) if c["kind"] == "all-reduce" and _phase(op_name) == "backward" else None
            if c["kind"] == "all-reduce":
                if hit is not None and hit[1]:
                    cat, sent = "gradient reduce-scatter", nbytes * (g - 1) / g
                else:
                    cat = "statistics all-reduce" if hit is None else "gradient all-reduce"
                    sent = 2 * nbytes * (g - 1) / g
            elif c["kind"] == "all-gather":
                cat, sent = "parameter all-gather", nbytes * (g - 1) / g
            elif c["kind"] == "reduce-scatter":
                cat, sent = "other", nbytes * (g - 1)  # the result is one device's part of the input
            elif c["kind"] == "all-to-all":
                cat, sent = "other", nbytes * (g - 1) / g
            else:
                cat, sent = "other", nbytes
            if hit is not None and matched[hit[0]] > 1:
                repeated_bytes += k * nbytes
            out[cat]["payload"] += k * nbytes
            out[cat]["sent"] += k * sent
            touched.add(cat)
        for cat in touched:
            out[cat]["ops"] += k
    out["unmatched parameters"] = sorted("/".join(p) for _, _, p in params if p not in matched)
    out["reduced more than once"] = sorted(f"{'/'.join(p)} ({k}x)" for p, k in matched.items() if k > 1)
    out["repeated bytes"] = repeated_bytes
    return out


def host_callbacks(hlo_text: str) -> list[str]:
    """The JAX ops that call back to the host from inside the program (`jax.debug.print`, `pure_callback`...)."""
    names = []
    for line in hlo_text.splitlines():
        if re.search(r'custom_call_target="[^"]*callback', line):
            m = re.search(r'op_name="([^"]*)"', line)
            names.append(m.group(1) if m else line.strip()[:80])
    return names


# ----------------------------------------------------------------------------------------------- one device count


def _leaves_with_paths(tree: Any) -> list[tuple[str, Any]]:
    import jax

    return [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _device_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of `ShapeDtypeStruct`s with shardings."""
    import jax
    import numpy as np

    return int(sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(tree)))


def _is_spread(x: Any) -> bool:
    return any(axis is not None for axis in getattr(x.sharding, "spec", ()))


def recompile_problems(step: Any, lowered: Any, compiled: Any) -> list[str]:
    """State leaves that leave the step unlike they entered it (shape, dtype, weak type or sharding): the next
    step would be compiled again, every step."""
    import jax

    state_in = _leaves_with_paths(step.state)
    state_out = _leaves_with_paths(lowered.out_info[0])
    shard_in = jax.tree.leaves(compiled.input_shardings[0][0])
    shard_out = jax.tree.leaves(compiled.output_shardings[0])
    problems = []
    for (path, a), (_, b), si, so in zip(state_in, state_out, shard_in, shard_out):
        if (tuple(a.shape), a.dtype, bool(getattr(a, "weak_type", False))) != \
                (tuple(b.shape), b.dtype, bool(getattr(b, "weak_type", False))):
            problems.append(f"state{path} enters the step as {a.dtype}{list(a.shape)} and leaves it as "
                            f"{b.dtype}{list(b.shape)}{' (weak type)' if getattr(b, 'weak_type', False) else ''}: "
                            "every step would compile again; make the step return it unchanged in type")
        elif not si.is_equivalent_to(so, len(a.shape)):
            problems.append(f"state{path} enters the step sharded {si} and leaves it {so}: every step would "
                            "compile again; give the step's out_shardings the state's shardings")
    if len(state_in) != len(state_out):
        problems.append("the step returns a state of another structure than it takes: every step would compile "
                        "again")
    return problems


def fsdp_whole(step: Any) -> list[tuple[str, tuple[int, ...], int]]:
    """Under FSDP: arrays of at least `fsdp_min_size` elements left whole on every device (no axis divisible by
    the device count), as `(path, shape, bytes)`, largest first."""
    import numpy as np

    if not step.layout.fsdp:
        return []
    trees = {"state": step.state, "teacher": step.teacher_vars}
    whole = []
    for name, tree in trees.items():
        for path, x in _leaves_with_paths(tree):
            if math.prod(x.shape) >= step.layout.min_size and not _is_spread(x):
                whole.append((name + path, tuple(x.shape), math.prod(x.shape) * np.dtype(x.dtype).itemsize))
    return sorted(whole, key=lambda w: -w[2])


def analyse(config: Any, *, per_device_batch: Optional[int], max_boxes: int, all_shapes: bool) -> list[dict]:
    """Compile `config`'s step on every device of this process (one row per batch shape of its data)."""
    import jax

    from cankd_jax.data import train_example_layouts
    from cankd_jax.train.aot import abstract_step, compile_for_analysis
    from cankd_jax.train.sharding import make_mesh

    mesh = make_mesh()
    n = mesh.devices.size
    global_batch = int(per_device_batch) * n if per_device_batch else int(config.batch_size)
    examples = train_example_layouts(config.data, max_boxes=max_boxes)
    rows = []
    for example in examples if all_shapes else examples[:1]:
        row: dict[str, Any] = {"devices": n, "layout": "fsdp" if config.mesh.get("fsdp") else "replicated",
                               "global_batch": global_batch, "input": list(example["image"].shape[:2])}
        t0 = time.perf_counter()
        try:
            step = abstract_step(config, mesh, example, global_batch=global_batch)
        except ValueError as e:  # a batch the devices do not divide, an unknown name: the row says so
            rows.append({**row, "error": str(e)})
            continue
        lowered = step.lower()
        compiled = compile_for_analysis(lowered)
        row["compile_s"] = time.perf_counter() - t0
        text = compiled.as_text()
        m = compiled.memory_analysis()
        state = step.state
        params = [(math.prod(x.shape), _is_spread(x), tuple(str(getattr(k, "key", k)) for k in path))
                  for path, x in jax.tree_util.tree_flatten_with_path(state.params)[0]]
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        colls = collectives(text, n)
        row.update(
            per_device_batch=global_batch // n,
            params=_device_bytes(state.params), optimizer=_device_bytes(state.opt_state),
            stats=_device_bytes(state.batch_stats), teacher=_device_bytes(step.teacher_vars),
            batch=_device_bytes(step.batch), param_bytes_total=int(sum(
                math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(state.params))),
            temp=m.temp_size_in_bytes, arguments=m.argument_size_in_bytes, outputs=m.output_size_in_bytes,
            aliased=m.alias_size_in_bytes,
            peak=m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes,
            flops=float((cost or {}).get("flops", float("nan"))),
            traffic=traffic(colls, params),
            loops=sum(1 for c in colls if c["in_loop"]),
            problems=recompile_problems(step, lowered, compiled)
            + [f"the step calls the host at {name}: every step would wait for Python; remove it from the step"
               for name in host_callbacks(text)],
            whole=[[p, list(s), b] for p, s, b in fsdp_whole(step)],
            dtype=str(config.get("dtype", "float32")), backend=jax.default_backend(), jax=jax.__version__)
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------- the model and report


def step_time(row: dict, *, tflops: float, bandwidth_gbs: float, latency_us: float) -> dict[str, float]:
    """Seconds of one step: compute (FLOPs at `tflops`), communication (ring bytes at `bandwidth_gbs` plus
    `latency_us` per collective launch), and their sum (no overlap) and maximum (full overlap)."""
    t = row["traffic"]
    sent = sum(t[c]["sent"] for c in CATEGORIES)
    ops = sum(t[c]["ops"] for c in CATEGORIES)
    compute = row["flops"] / (tflops * 1e12)
    comm = sent / (bandwidth_gbs * 1e9) + ops * latency_us * 1e-6
    return {"compute": compute, "comm": comm, "serial": compute + comm, "overlapped": max(compute, comm),
            "sent": sent, "ops": ops}


def table(rows: list[dict], args: argparse.Namespace) -> str:
    head = ("| devices | layout | batch (global / device) | input | params + optimizer + stats GB | teacher GB | "
            "temporaries GB | peak GB | fits " + f"{args.device_gb:g} GB | gradient all-reduce MB | gradient "
            "reduce-scatter MB | parameter all-gather MB | statistics all-reduce MB | collectives / step | "
            "sent / device MB | GFLOP / device | step ms: compute + comm (overlapped) | compile s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        batch = f"{r.get('global_batch', '?')} / {r.get('per_device_batch', '?')}"
        shape = "x".join(map(str, r.get("input", []))) or "?"
        if "error" in r:
            lines.append(f"| {r['devices']} | {r['layout']} | {batch} | {shape} | error: {r['error']} |"
                         + " |" * (head.count("|") - 6))
            continue
        t, st = r["traffic"], step_time(r, tflops=args.tflops, bandwidth_gbs=args.bandwidth, latency_us=args.latency_us)
        state = (r["params"] + r["optimizer"] + r["stats"]) / GB
        lines.append(
            f"| {r['devices']} | {r['layout']} | {batch} | {shape} | {state:.3f} | {r['teacher'] / GB:.3f} | "
            f"{r['temp'] / GB:.2f} | {r['peak'] / GB:.2f} | {'yes' if r['peak'] <= args.device_gb * GB else 'no'} | "
            + " | ".join(f"{t[c]['payload'] / MB:.1f}" for c in CATEGORIES[:4])
            + f" | {st['ops']} | {st['sent'] / MB:.1f} | {r['flops'] / 1e9:.4g} | "
            f"{st['compute'] * 1e3:.1f} + {st['comm'] * 1e3:.1f} ({st['overlapped'] * 1e3:.1f}) | {r['compile_s']:.0f} |")
    return "\n".join(lines)


def _first(items: list[str], k: int) -> str:
    return ", ".join(items[:k]) + (", ..." if len(items) > k else "")


def notes(rows: list[dict], args: argparse.Namespace) -> list[str]:
    """Errors, warnings and notes of the rows, each message once with the rows it applies to."""
    found: dict[str, list[str]] = {}
    for r in rows:
        where = f"{r['devices']} {r['layout']} {'x'.join(map(str, r.get('input', [])))}"
        messages = [f"error: {p}" for p in r.get("problems", [])]
        if r.get("whole"):
            total = sum(b for *_, b in r["whole"])
            path, shape, _ = r["whole"][0]
            messages.append(
                f"{'error' if args.strict else 'warning'}: {len(r['whole'])} arrays of at least fsdp_min_size "
                f"elements ({total / MB:.1f} MB) stay whole on every device because {r['devices']} divides none "
                f"of their axes (largest: {path} {tuple(shape)}); use a device count that divides them, or raise "
                "--config.mesh.fsdp_min_size to keep them replicated on purpose")
        unmatched = r.get("traffic", {}).get("unmatched parameters")
        if unmatched:
            messages.append(
                f"note: {len(unmatched)} parameters have no reduction of their own gradient ({_first(unmatched, 3)}): "
                "frozen ones have no gradient; for the others XLA reduces a product before their last matmul, "
                "counted under statistics")
        repeated = r.get("traffic", {}).get("reduced more than once")
        if repeated:
            messages.append(
                f"note: {len(repeated)} parameters' gradients are reduced once per use ({_first(repeated, 2)}; "
                f"{r['traffic']['repeated bytes'] / MB:.0f} MB more than once each): XLA:CPU reduces each use's part before adding them (XLA's all-reduce-reassociate "
                "pass can add first; whether an accelerator's compiler does so here is not checked)")
        if r.get("loops"):
            messages.append(f"note: {r['loops']} collectives sit in loops of unknown trip count and are counted once")
        for m in messages:
            found.setdefault(m, []).append(where)
    return [f"{m} [{', '.join(w)}]" for m, w in found.items()]


def assumptions(args: argparse.Namespace, rows: list[dict]) -> str:
    ok = [r for r in rows if "error" not in r]
    compiled = (f"compiled for {ok[0]['backend']} devices faked on this machine (JAX {ok[0]['jax']}), "
                f"{ok[0]['dtype']}" if ok else "nothing compiled")
    return (f"{compiled}. Step-time model: compute = the per-device program's FLOPs (XLA's cost analysis) at "
            f"{args.tflops:g} TFLOP/s achieved per device; communication = the bytes each device sends on a "
            f"ring at {args.bandwidth:g} GB/s plus {args.latency_us:g} us per collective launch (XLA:CPU's "
            "launches: an accelerator's compiler combines small collectives into fewer); 'overlapped' assumes "
            "communication hides entirely behind compute, the sum that none does. Memory: XLA:CPU's buffer "
            "assignment, an estimate of an accelerator's (benchmarks/memory.py). Weights and data are not read; "
            f"detection labels padded to {args.max_boxes} boxes where the config leaves the count to the data.")


# ----------------------------------------------------------------------------------------------- command line


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    ap = argparse.ArgumentParser(prog="python -m cankd_jax.rehearse", description=__doc__.split("\n")[0],
                                 epilog="--config configs/NAME.py[:ARG] and --config.key=value overrides as for "
                                        "train.py")
    ap.add_argument("--devices", nargs="+", type=int, default=[8, 64, 256], help="device counts to compile for")
    ap.add_argument("--layouts", nargs="+", choices=["replicated", "fsdp"], default=None,
                    help="parameter layouts (default: the config's mesh.fsdp)")
    ap.add_argument("--fsdp", action="store_true", help="the same as --layouts fsdp")
    ap.add_argument("--per-device-batch", nargs="+", type=int, default=None,
                    help="images per device (global batch = this x devices); default: the config's global batch")
    ap.add_argument("--shapes", choices=["all", "first"], default="all",
                    help="compile every batch shape the data yields (detection: landscape and portrait) or the first")
    ap.add_argument("--max-boxes", type=int, default=100,
                    help="padded boxes per detection image where data.max_boxes=0 leaves it to the data")
    ap.add_argument("--tflops", type=float, default=300.0,
                    help="achieved TFLOP/s per device for the time model (300: the Cityscapes step in bfloat16 "
                         "on one H200, results/gpu)")
    ap.add_argument("--bandwidth", type=float, default=50.0,
                    help="GB/s each device sends for collectives (50: a 400 Gb/s network port per device)")
    ap.add_argument("--latency-us", type=float, default=10.0, help="fixed cost of each collective launch, us")
    ap.add_argument("--device-gb", type=float, default=DEVICE_GB, help="device memory the peak is checked against")
    ap.add_argument("--strict", action="store_true", help="arrays FSDP cannot spread are an error, not a warning")
    ap.add_argument("--json", default="", help="write the rows to this file")
    ap.add_argument("--markdown", default="", help="write the report to this file")
    ap.add_argument("--worker", nargs=3, metavar=("DEVICES", "LAYOUT", "BATCH"), help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args(argv)
    if args.fsdp:
        args.layouts = ["fsdp"]
    bad = [d for d in args.devices if d < 1]
    if bad:
        ap.error(f"--devices must be positive, got {bad}")
    bad = [b for b in args.per_device_batch or () if b < 1]
    if bad:
        ap.error(f"--per-device-batch must be positive, got {bad}")
    for option in ("tflops", "bandwidth", "device_gb", "max_boxes"):  # divisors of the time model, or sizes
        if not getattr(args, option) > 0:
            ap.error(f"--{option.replace('_', '-')} must be positive, got {getattr(args, option)}")
    if not args.latency_us >= 0:
        ap.error(f"--latency-us must be >= 0, got {args.latency_us}")
    return args, rest


def _load_config(rest: list[str]) -> Any:
    """The config as train.py reads it (`--config FILE[:ARG]`, `--config.key=value`): a one-line exit on mistakes."""
    from absl import flags
    from ml_collections import config_flags

    fv = flags.FlagValues()
    holder = config_flags.DEFINE_config_file("config", None, "experiment config file", flag_values=fv,
                                             lock_config=True)
    for i, arg in enumerate(rest):
        path = arg.split("=", 1)[1] if arg.startswith("--config=") else (
            rest[i + 1] if arg == "--config" and i + 1 < len(rest) else None)
        if path and not os.path.exists(path.split(":", 1)[0]):
            sys.exit(f"rehearse: error: config file {path!r} not found (the configs are in configs/)")
    unknown = [a for a in rest if a.startswith("-") and not a.startswith("--config")]
    if unknown:
        sys.exit(f"rehearse: error: unknown option(s) {' '.join(unknown)} (see --help)")
    try:
        fv(["rehearse", *rest])
    except (flags.Error, AttributeError, KeyError, ValueError, TypeError, OSError) as e:
        msg = " ".join(str(e).split())
        if "Traceback" in msg:
            msg = re.split(r"\b\w*(?:Error|Exception): ", msg)[-1]
        sys.exit(f"rehearse: error: {msg}")
    if holder.value is None:
        sys.exit("rehearse: error: --config configs/NAME.py[:ARG] is required")
    return holder.value


def _worker(args: argparse.Namespace, rest: list[str]) -> None:
    devices, layout, batch = args.worker
    config = _load_config(rest)
    with config.unlocked():
        if config.get("mesh") is None:
            config.mesh = {}
        config.mesh.fsdp = layout == "fsdp"
    import jax

    if jax.device_count() != int(devices):
        raise SystemExit(f"rehearse: worker expected {devices} devices, JAX has {jax.device_count()}")
    rows = analyse(config, per_device_batch=int(batch) or None, max_boxes=args.max_boxes,
                   all_shapes=args.shapes == "all")
    print(RESULT_PREFIX + json.dumps(rows), flush=True)


def _worker_error(text: str) -> str:
    """The line of a worker's output that says what went wrong: its last exception line (JAX's note on the
    traceback frames it removed comes after it), else its last line."""
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith(("For simplicity, JAX", "-----"))]
    errors = [ln for ln in lines if re.match(r"[\w.]+(Error|Exception|Exit)\b", ln)]
    return ((errors or lines)[-1:] or ["killed"])[0]


def run_worker(argv: list[str], devices: int, layout: str, batch: int) -> list[dict]:
    """Rows for one (device count, layout, per-device batch), from a process with that many CPU devices."""
    flags_env = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"{flags_env} --xla_force_host_platform_device_count={devices}".strip()}
    proc = subprocess.run([sys.executable, "-m", "cankd_jax.rehearse", *argv, "--worker", str(devices), layout,
                           str(batch)], capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    tail = [_worker_error(proc.stderr or proc.stdout)]
    return [{"devices": devices, "layout": layout, "global_batch": "?", "per_device_batch": batch or "?",
             "error": f"worker exit {proc.returncode}: {tail[0][:300]}"}]


def main(argv: list[str]) -> int:
    args, rest = _parse(argv)
    if args.worker:
        _worker(args, rest)
        return 0
    config = _load_config(rest)  # a mistake in the config or its overrides ends here, before any compile
    layouts = args.layouts or (["fsdp"] if config.get("mesh", {}).get("fsdp") else ["replicated"])
    target = " ".join(rest)
    print(f"rehearsal of {target}: {', '.join(map(str, args.devices))} devices, {' and '.join(layouts)}", flush=True)
    rows = []
    for batch in args.per_device_batch or [0]:
        for layout in layouts:
            for devices in args.devices:
                got = run_worker(argv, devices, layout, batch)
                rows.extend(got)
                for r in got:
                    status = r.get("error") or (f"peak {r['peak'] / GB:.2f} GB, "
                                                f"{step_time(r, tflops=args.tflops, bandwidth_gbs=args.bandwidth, latency_us=args.latency_us)['sent'] / MB:.1f} MB sent per device, "
                                                f"compiled in {r['compile_s']:.0f} s")
                    print(f"  {devices:>4} devices, {layout}, {'x'.join(map(str, r.get('input', [])))}: {status}",
                          flush=True)
    command = "python -m cankd_jax.rehearse " + " ".join(argv)
    report = "\n\n".join([f"# Rehearsal of `{target}`", f"    {command}", table(rows, args), assumptions(args, rows),
                          *(["\n".join(f"- {n}" for n in notes(rows, args))] if notes(rows, args) else [])])
    print("\n" + report)
    if args.markdown:
        os.makedirs(os.path.dirname(os.path.abspath(args.markdown)), exist_ok=True)
        with open(args.markdown, "w") as f:
            f.write(report + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    failed = any("error" in r or r.get("problems") or (args.strict and r.get("whole")) for r in rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
