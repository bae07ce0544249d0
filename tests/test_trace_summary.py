"""benchmarks/trace_summary.py on a hand-written trace: device processes only, overlapping kernels counted once
in the busy time, per-name and per-HLO-op sums divided by the step count, kernel classes by name."""

from __future__ import annotations

import gzip
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import trace_summary  # noqa: E402


def _trace(path):
    meta = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
            {"ph": "M", "pid": 7, "name": "process_name", "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "pid": 7, "tid": 1, "name": "thread_name", "args": {"name": "Stream #14(Compute)"}},
            {"ph": "M", "pid": 7, "tid": 2, "name": "thread_name", "args": {"name": "Stream #15(Compute)"}},
            {"ph": "M", "pid": 7, "tid": 3, "name": "thread_name", "args": {"name": "XLA Ops"}}]
    kernels = [  # (tid, ts, dur, name, hlo_op); times in microseconds
        (1, 0, 100, "sm90_xmma_fprop_implicit_gemm_bf16", "cudnn-conv.1"),
        (1, 100, 50, "loop_add_fusion", "fusion.2"),
        (1, 1000, 100, "sm90_xmma_fprop_implicit_gemm_bf16", "cudnn-conv.1"),
        (1, 1100, 30, "nvjet_sm90_tst_128x128", "custom-call.3"),
        (2, 120, 60, "ncclDevKernel_AllReduce", "all-reduce.4"),  # overlaps 120-150 with the fusion
    ]
    events = meta + [{"ph": "X", "pid": 7, "tid": t, "ts": ts, "dur": dur, "name": n, "args": {"hlo_op": op}}
                     for t, ts, dur, n, op in kernels]
    events += [{"ph": "X", "pid": 7, "tid": 3, "ts": 0, "dur": 180, "name": "fusion.2"},  # restates the streams
               {"ph": "X", "pid": 1, "tid": 9, "ts": 0, "dur": 5000, "name": "PjitFunction(step)"}]  # host: ignored
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)


def test_summary_of_a_hand_written_trace(tmp_path):
    path = str(tmp_path / "perfetto_trace.json.gz")
    _trace(path)
    s = trace_summary.summarize(path, steps=2)
    # Busy: [0, 180) (conv, fusion, then the all-reduce to 180) and [1000, 1130) -> 310 us over 2 steps.
    assert s["totals"]["devices"] == ["/device:GPU:0"]
    assert s["totals"]["device_busy_ms_per_step"]["/device:GPU:0"] == pytest.approx(0.155)
    threads = {t["thread"]: t for t in s["threads"]}
    assert set(threads) == {"Stream #14(Compute)", "Stream #15(Compute)", "XLA Ops"}
    main = threads["Stream #14(Compute)"]
    assert main["names"][0] == ("sm90_xmma_fprop_implicit_gemm_bf16", pytest.approx(0.1), 1.0)
    assert dict((n, ms) for n, ms, _ in main["hlo"]) == {"cudnn-conv.1": pytest.approx(0.1),
                                                         "fusion.2": pytest.approx(0.025),
                                                         "custom-call.3": pytest.approx(0.015)}
    assert dict(main["classes"]) == {"convolution": pytest.approx(0.1), "elementwise fusion": pytest.approx(0.025),
                                     "matmul": pytest.approx(0.015)}
    assert dict(threads["Stream #15(Compute)"]["classes"]) == {"collective": pytest.approx(0.03)}
    text = trace_summary.to_markdown(s)
    assert "| convolution | 0.100 | 71.4% |" in text and "/ Stream #14(Compute): 4 events, busy 0.14 ms" in text


@pytest.mark.parametrize("name, cls", [
    ("sm80_xmma_fprop_implicit_gemm_indexed_bf16bf16", "convolution"),
    ("sm90_xmma_wgrad_indexed_implicit_gemm_bf16", "convolution"),
    ("nvjet_sm90_tst_128x160_64x5_2x1_v_bz_NNT", "matmul"),
    ("void cutlass::Kernel2<cutlass_80_simt_sgemm_256x128_8x4_nn_align1>", "matmul"),
    ("input_transpose_fusion_9", "copy"),
    ("input_divide_reduce_fusion", "reduction"),
    ("loop_maximum_fusion_1", "elementwise fusion"),
    ("redzone_checker", "other"),
])
def test_kernel_classes(name, cls):
    assert trace_summary.kernel_class(name) == cls
