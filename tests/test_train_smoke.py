"""End to end through train_and_evaluate: a smoke run, and resuming from a checkpoint is exact."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from cankd_jax.config_arg import load_config
from cankd_jax.train.trainer import train_and_evaluate

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def _smoke(tmp_path, **overrides):
    cfg = load_config(os.path.join(CONFIGS, "smoke.py"))
    cfg.data.data_dir = str(tmp_path / "data")
    cfg.update(overrides)
    return cfg


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if '"loss"' in line]


def test_resume_after_a_lost_checkpoint_equals_the_straight_run(tmp_path):
    cfg = _smoke(tmp_path, total_steps=8, log_every=1, eval_every=8, checkpoint_every=4, keep_checkpoints=3)
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    a = train_and_evaluate(cfg, straight)
    train_and_evaluate(cfg, resumed)
    # Lose everything after step 4, as a crash between checkpoints would, and run the same command again.
    shutil.rmtree(os.path.join(resumed, "checkpoints", "8"))
    with open(os.path.join(resumed, "metrics.jsonl")) as f:
        kept = [line for line in f if json.loads(line)["step"] <= 4 and '"loss"' in line]
    with open(os.path.join(resumed, "metrics.jsonl"), "w") as f:
        f.writelines(kept)
    b = train_and_evaluate(cfg, resumed)
    ra, rb = _rows(straight), _rows(resumed)
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == list(range(1, 9))
    for x, y in zip(ra, rb, strict=True):
        for k in x:
            if k.startswith(("loss", "task/", "distill/", "lr", "grad_norm")):
                assert x[k] == y[k], (x["step"], k, x[k], y[k])
    assert a["eval"] == pytest.approx(b["eval"], abs=0)
    assert a["finished"] and b["finished"]
    assert os.path.exists(os.path.join(resumed, "export", "student.pth"))
    # A finished run re-opened only reports.
    c = train_and_evaluate(cfg, straight)
    assert c["step"] == 8 and c["eval"] == a["eval"] and len(_rows(straight)) == 8
