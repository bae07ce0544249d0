"""Where the time of a traced step goes: a `jax.profiler` Perfetto trace summed per op.

    python benchmarks/trace_summary.py TRACE.json.gz --steps 3 > ops.md

Reads the `perfetto_trace.json.gz` that `jax.profiler.trace(..., create_perfetto_trace=True)`
writes (Chrome trace-event JSON) and, for every device process in it (process names
with `/device:`, e.g. `/device:GPU:0`), every thread (a CUDA stream, or the profiler's
"XLA Ops" / "XLA Modules" lines), sums the complete (`ph: X`) events' durations by name:
time per step in ms, share of the thread's busy time, calls per step. A kernel's HLO
op, where the trace names it in the event's arguments (`hlo_op`, `long_name`), is
summed too, so a kernel can be traced back to the compiled program's text.
Kernels are also put into classes by name (convolution, matmul, elementwise fusion,
reduction, copy, collective, other): the first question of a profile is which class
holds the time. Devices' busy time is the union of their events' intervals, so
overlapping streams are not counted twice.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import sys
from arg_types import count  # this folder's command-line value types  # noqa: E402

# kernel class -> name patterns (case-insensitive), tried in order; the first hit wins.
KERNEL_CLASSES = (
    ("convolution", r"conv|cudnn|xmma_fprop|xmma_dgrad|xmma_wgrad|fprop|dgrad|wgrad|implicit_gemm|winograd"),
    ("matmul", r"gemm|cublas|cutlass|nvjet|matmul|sm\d+_xmma|triton_gemm|dot"),
    ("collective", r"nccl|all_reduce|all-reduce|allreduce|all_gather|reduce_scatter|collective"),
    ("copy", r"memcpy|memset|copy|transpose"),
    ("reduction", r"reduce|reduction"),
    ("elementwise fusion", r"fusion|loop_|input_|elementwise|triton"),
)
HLO_ARGS = ("hlo_op", "long_name", "tf_op")


def kernel_class(name: str) -> str:
    for cls, pattern in KERNEL_CLASSES:
        if re.search(pattern, name, re.IGNORECASE):
            return cls
    return "other"


def _union_us(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


def load_events(path: str) -> list[dict]:
    with gzip.open(path, "rt") if path.endswith(".gz") else open(path) as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def summarize(path: str, steps: int = 1, top: int = 40) -> dict:
    """{'totals': ..., 'threads': [...]} for the device processes of the trace at `path`; times per step in ms."""
    events = load_events(path)
    process = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    thread = {(e["pid"], e.get("tid")): e["args"]["name"] for e in events
              if e.get("ph") == "M" and e.get("name") == "thread_name"}
    devices = {pid for pid, name in process.items() if "/device:" in name}
    by_thread: dict = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in devices and "dur" in e:
            by_thread[(e["pid"], e.get("tid"))].append(e)
    threads, totals = [], {"steps": steps, "devices": sorted(process[p] for p in devices)}
    device_busy: dict = collections.defaultdict(list)
    for key, evs in sorted(by_thread.items(), key=lambda kv: -sum(e["dur"] for e in kv[1])):
        name = thread.get(key, str(key[1]))
        busy = _union_us([(e["ts"], e["ts"] + e["dur"]) for e in evs])
        # The profiler's "XLA Ops"/"XLA Modules" lines restate the streams' kernels: kept out of the busy total.
        if not re.search(r"xla ops|xla modules|tensorflow ops|source", name, re.IGNORECASE):
            device_busy[key[0]].extend((e["ts"], e["ts"] + e["dur"]) for e in evs)
        per_name: dict = collections.defaultdict(lambda: [0.0, 0])
        per_hlo: dict = collections.defaultdict(lambda: [0.0, 0])
        per_class: dict = collections.defaultdict(float)
        for e in evs:
            per_name[e["name"]][0] += e["dur"]
            per_name[e["name"]][1] += 1
            per_class[kernel_class(e["name"])] += e["dur"]
            args = e.get("args") or {}
            hlo = next((str(args[k]) for k in HLO_ARGS if k in args), None)
            if hlo:
                per_hlo[hlo][0] += e["dur"]
                per_hlo[hlo][1] += 1
        span = max(e["ts"] + e["dur"] for e in evs) - min(e["ts"] for e in evs)
        threads.append({
            "process": process[key[0]], "thread": name, "events": len(evs),
            "busy_ms_per_step": busy / 1e3 / steps, "span_ms_per_step": span / 1e3 / steps,
            "arg_keys": sorted({k for e in evs[:200] for k in (e.get("args") or {})}),
            "classes": sorted(((c, t / 1e3 / steps) for c, t in per_class.items()), key=lambda x: -x[1]),
            "names": [(n, t / 1e3 / steps, c / steps) for n, (t, c) in
                      sorted(per_name.items(), key=lambda kv: -kv[1][0])[:top]],
            "hlo": [(n, t / 1e3 / steps, c / steps) for n, (t, c) in
                    sorted(per_hlo.items(), key=lambda kv: -kv[1][0])[:top]],
        })
    totals["device_busy_ms_per_step"] = {process[p]: _union_us(iv) / 1e3 / steps for p, iv in device_busy.items()}
    return {"totals": totals, "threads": threads}


def to_markdown(summary: dict) -> str:
    t = summary["totals"]
    lines = [f"# Trace summary: {t['steps']} step(s); times in ms per step", ""]
    for dev, busy in t["device_busy_ms_per_step"].items():
        lines.append(f"- {dev}: busy {busy:.2f} ms per step (union of its streams' kernels)")
    for th in summary["threads"]:
        lines += ["", f"## {th['process']} / {th['thread']}: {th['events']} events, busy {th['busy_ms_per_step']:.2f} "
                  f"ms of a {th['span_ms_per_step']:.2f} ms span per step", f"argument keys: {', '.join(th['arg_keys'])}",
                  "", "| class | ms per step | share |", "|---|---|---|"]
        total = sum(ms for _, ms in th["classes"]) or 1.0
        lines += [f"| {c} | {ms:.3f} | {100 * ms / total:.1f}% |" for c, ms in th["classes"]]
        for title, rows in (("name", th["names"]), ("HLO op", th["hlo"])):
            if not rows:
                continue
            lines += ["", f"| {title} | ms per step | share | calls per step |", "|---|---|---|---|"]
            lines += [f"| `{n[:150]}` | {ms:.3f} | {100 * ms / total:.1f}% | {c:g} |" for n, ms, c in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("trace", help="perfetto_trace.json.gz")
    ap.add_argument("--steps", type=count(1), default=1, help="steps in the trace (times are divided by it)")
    ap.add_argument("--top", type=count(1), default=40, help="rows per table")
    args = ap.parse_args(argv)
    sys.stdout.write(to_markdown(summarize(args.trace, args.steps, args.top)))


if __name__ == "__main__":
    main(sys.argv[1:])
