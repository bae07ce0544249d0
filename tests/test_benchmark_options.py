"""The benchmarks' counts and sizes are checked where they are parsed: `--k 0`, `--chunk 0`, `--steps -1` and
`--queries 0` were a traceback from inside a timed call, a ZeroDivisionError, every cell failing after a minute
of compiling, and a case timed at another size than its label."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import arg_types  # noqa: E402
import train_speed  # noqa: E402


def test_the_types_take_their_range_and_name_the_rest():
    assert arg_types.count(1)("3") == 3 and arg_types.count(0)("0") == 0
    assert arg_types.positive("0.5") == 0.5 and arg_types.fraction("1") == 1.0
    for parse, text, message in [(arg_types.count(1), "0", "must be at least 1, got 0"),
                                 (arg_types.count(1), "x", "expected an integer, got 'x'"),
                                 (arg_types.positive, "0", "must be a positive number, got 0"),
                                 (arg_types.positive, "inf", "must be a positive number, got inf"),
                                 (arg_types.fraction, "1.5", r"must be a number in \[0, 1\], got 1.5"),
                                 (arg_types.fraction, "nan", r"must be a number in \[0, 1\], got nan")]:
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            parse(text)


def test_train_speed_refuses_steps_below_one(capsys):
    with pytest.raises(SystemExit):
        train_speed.parser().parse_args(["--cases", "demo", "--steps", "-1"])
    assert "argument --steps: must be at least 1, got -1" in capsys.readouterr().err


@pytest.mark.parametrize("script, option", [("nms_speed.py", "--k"), ("deform_attn_speed.py", "--queries")])
def test_a_script_refuses_a_zero_count_before_any_work(script, option):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), option, "0"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and f"argument {option}: must be at least 1, got 0" in proc.stderr, proc.stderr


def test_the_demos_are_compared_with_the_record_of_the_processor_they_run_on():
    """The demos' figures depend on the processor (XLA:CPU compiles for it): a run on the Xeon host is held to the
    record measured there, anywhere else to summary.json (the AMD EPYC machine's)."""
    import json

    import demos

    recorded = [demo for demo, path in demos.RESULTS.items()
                if os.path.exists(os.path.join(ROOT, path.replace("summary.json", "summary_xeon.json")))]
    assert recorded == list(demos.RESULTS), recorded  # every demo has a record from that host
    for demo in recorded:
        path = demos.RESULTS[demo]
        with open(os.path.join(ROOT, path)) as f:
            epyc = json.load(f)
        with open(os.path.join(ROOT, path.replace("summary.json", "summary_xeon.json"))) as f:
            xeon = json.load(f)
        figures, record = demos.committed(demo, xeon["host"])
        assert record == path.replace("summary.json", "summary_xeon.json")
        assert figures == {p: 100 * xeon[p] for p in ("teacher", "student", "cankd")}
        figures, record = demos.committed(demo, "AMD EPYC 9R14")
        assert record == path and figures == {p: 100 * epyc[p] for p in ("teacher", "student", "cankd")}
        assert demos.committed(demo, "")[1] == path
