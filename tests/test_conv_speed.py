"""benchmarks/conv_speed.py times the convolutions the train step runs: the student's whole forward pass, the
teacher's only up to the features the distillation terms read (XLA drops the teacher's heads, and so does the
script's trace)."""

from __future__ import annotations

import os
import sys

import jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import conv_speed  # noqa: E402

from cankd_jax.config_arg import load_config  # noqa: E402
from cankd_jax.train import build  # noqa: E402
from cankd_jax.train.sharding import make_mesh  # noqa: E402


def test_the_teachers_rows_stop_at_the_distilled_feature():
    # the smoke teacher: a ResNet-18-d8 of width 16 (layer4: 128 channels) under an FCN head of 32 channels,
    # distilled at layer4
    config = load_config(os.path.join(ROOT, "configs", "smoke.py"))
    run = build.build_run(config, make_mesh(jax.devices()[:1]), input_size=(32, 32))
    whole = conv_speed.network_convs(run.teacher, (32, 32), 2)
    step = conv_speed.teacher_step_convs(run, (32, 32), 2)
    assert step and not step - whole and step != whole  # some of the network's convolutions, none of another's
    head_in = [c for c in whole if c[1] == (3, 3, 128, 32)]  # the head's first conv reads layer4
    assert head_in and not any(c in step for c in head_in)
    layer4 = [c for c in whole if c[1] == (3, 3, 128, 128)]
    assert layer4 and all(step[c] == whole[c] for c in layer4)
