"""`train.py` end to end as a pod would run it: one data order and one set of numbers on any topology,
preemption and crashes survived exactly, FSDP equal to replication, honest files after a crash.

Every run is the smoke config for 8 steps; the reference is one process on one device. Three compiled
programs serve all the runs: 1 device; 1 process x 4 devices, replicated; 2 processes x 2 devices, FSDP. The
session's compilation cache shares them with one exception that sets this module's time: process 1 of a
2-process CPU job never hits it (jax 0.10: the cache key hashes XLA:CPU's topology fingerprint, which differs
per process, and only process 0 writes), so every 2-process run compiles the FSDP step again in process 1
(39 s measured on the 2-core machine while it ran other work), and the module keeps to two 2-process runs. The
slow tier: `pytest -m slow`.
"""

from __future__ import annotations

import os
import shutil
import signal

import numpy as np
import pytest

import train_cli as cli
from train_cli import EIGHT_STEPS

FSDP = ("--config.mesh.fsdp=True", "--config.mesh.fsdp_min_size=256")  # small enough to spread most smoke arrays
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    """One process, one device, 8 steps straight through."""
    workdir = tmp_path_factory.mktemp("reference") / "run"
    cli.run(cli.command(workdir, f"--config.data.data_dir={data_dir}", *EIGHT_STEPS), devices=1)
    return workdir


def _args(workdir, data_dir, *extra):
    return cli.command(workdir, f"--config.data.data_dir={data_dir}", *EIGHT_STEPS, *extra)


def test_reference_run_logs_every_step_once_and_a_finished_run_only_reports(reference, data_dir):
    rows = cli.rows(reference)
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert all(np.isfinite(r["loss"]) for r in rows)
    done = cli.summary(reference)
    assert done["finished"] and done["metric"] == "mIoU" and cli.checkpoint_steps(reference) == [4, 8]
    assert os.path.exists(reference / "export" / "student.pth")
    before = cli.all_rows(reference)
    out = cli.run(_args(reference, data_dir), devices=1)[0]
    assert "resumed from step 8" in out and "| run | 8 |" in out
    assert cli.all_rows(reference) == before and cli.summary(reference)["eval"] == done["eval"]
    # Asked for fewer steps than the workdir's run took: said so, nothing trained or set aside
    out = cli.run(_args(reference, data_dir, "--config.total_steps=5"), devices=1)[0]
    assert "the checkpoint (step 8) is past total_steps=5: nothing to train" in out and "| run | 8 |" in out
    assert "1 setting(s) changed since that checkpoint was written (then -> now): total_steps: 8 -> 5" in out
    assert cli.all_rows(reference) == before and cli.checkpoint_steps(reference) == [4, 8]
    # Another seed draws another (random) teacher: the checkpoint was distilled from the first one, so refused
    [(code, out)] = cli.finish(cli.start(_args(reference, data_dir, "--config.seed=1"), devices=1))
    assert code != 0 and "Traceback" not in out, out[-3000:]
    assert "train.py: error: the checkpoint at step 8" in out and "was distilled from other teacher weights" in out
    assert "then: a random teacher of seed 0" in out and "now: a random teacher of seed 1" in out
    assert cli.all_rows(reference) == before and cli.checkpoint_steps(reference) == [4, 8]


def test_sigterm_during_start_up_saves_after_one_step_and_the_rerun_is_exact(tmp_path, reference, data_dir):
    workdir = tmp_path / "run"
    procs = cli.start(_args(workdir, data_dir), devices=1, log_dir=tmp_path, fault={0: "SIGTERM@0"})
    [(code, _)] = cli.finish(procs)
    log = cli.read_log(tmp_path)
    assert code == 0, log[-3000:]
    assert "SIGTERM received" in log
    assert cli.checkpoint_steps(workdir) == [1] and not cli.summary(workdir)["finished"]
    assert not (workdir / "export").exists()  # only a finished run exports
    out = cli.run(_args(workdir, data_dir), devices=1)[0]
    assert "resumed from step 1" in out
    cli.assert_same_training(cli.rows(workdir), cli.rows(reference))  # same topology: bit for bit
    assert cli.summary(workdir)["eval"] == cli.summary(reference)["eval"]


def test_kill_9_then_resume_on_two_processes_under_fsdp(tmp_path, reference, data_dir):
    """A crash between checkpoints of a 1-process, 4-device run; the job resumes as 2 processes x 2 devices with
    FSDP: another process count, device count and parameter layout, the same numbers."""
    workdir = tmp_path / "run"
    logs = tmp_path / "first"
    logs.mkdir()
    # The run kills itself (SIGKILL) right after step 5: between the checkpoints at 4 and 8, whatever the timing.
    procs = cli.start(_args(workdir, data_dir, "--config.eval_every=6"), devices=4, log_dir=logs,
                      fault={0: "SIGKILL@5"})
    [(code, _)] = cli.finish(procs)
    assert code == -signal.SIGKILL, cli.read_log(logs)[-3000:]
    assert cli.checkpoint_steps(workdir) == [4]
    assert [r["step"] for r in cli.rows(workdir)] == [1, 2, 3, 4, 5]

    resume = tmp_path / "resume"
    resume.mkdir()
    outs = cli.run(_args(workdir, data_dir, *FSDP, "--config.eval_every=6"), processes=2, devices=2, log_dir=resume)
    assert all("resumed from step 4" in out for out in outs)
    assert not any("setting(s) changed" in out for out in outs)  # the layout is bookkeeping, not a setting
    # The steps logged after step 4 by the crashed run are gone: each step once, and all as the reference ran them.
    cli.assert_same_training_across_topologies(cli.rows(workdir), cli.rows(reference), resumed=4)
    assert [r["step"] for r in cli.all_rows(workdir) if "teacher/mIoU" in r] == [0]
    assert cli.summary(workdir)["eval"]["mIoU"] == pytest.approx(cli.summary(reference)["eval"]["mIoU"], abs=2e-3)
    # The export gathers the parameters FSDP spread over both processes.
    torch = pytest.importorskip("torch")
    ours = torch.load(workdir / "export" / "student.pth", map_location="cpu")["state_dict"]
    theirs = torch.load(reference / "export" / "student.pth", map_location="cpu")["state_dict"]
    assert ours.keys() == theirs.keys()
    for k in theirs:
        np.testing.assert_allclose(ours[k].numpy(), theirs[k].numpy(), rtol=1e-4, atol=1e-5, err_msg=k)


def test_sigterm_to_one_process_of_two_stops_both_at_one_step_then_one_process_resumes(tmp_path, reference, data_dir):
    """2 processes x 2 devices with FSDP; the scheduler signals process 1 only. Both save at the same step and
    exit 0; one process on 4 devices, parameters replicated, resumes that checkpoint (the reverse of the kill -9
    test's move) and finishes with the reference's numbers. (Its compiled step is the kill -9 test's first run's,
    from the session's cache: a second 2-process run would compile again in process 1, see the module's note.)"""
    workdir = tmp_path / "run"
    logs = tmp_path / "first"
    logs.mkdir()
    procs = cli.start(_args(workdir, data_dir, *FSDP), processes=2, devices=2, log_dir=logs, fault={1: "SIGTERM@0"})
    results = cli.finish(procs)
    outs = [cli.read_log(logs, i) for i in range(2)]
    assert [code for code, _ in results] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    [stopped] = cli.checkpoint_steps(workdir)
    assert 1 <= stopped < 8
    assert all(f"every process saves a checkpoint at step {stopped}" in out for out in outs)
    assert not cli.summary(workdir)["finished"] and cli.summary(workdir)["step"] == stopped

    [out] = cli.run(_args(workdir, data_dir), devices=4)
    assert f"resumed from step {stopped}" in out
    cli.assert_same_training_across_topologies(cli.rows(workdir), cli.rows(reference), resumed=stopped)


def test_a_truncated_newest_checkpoint_is_set_aside_and_the_run_finishes(tmp_path, reference, data_dir):
    """The reference's newest checkpoint (step 8) with one file cut to half its size, as a full disk or a torn
    copy leaves it: the rerun falls back to step 4, sets step 8 aside, trains 5-8 as the reference did, saves
    step 8 again and finishes."""
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    files = [p for p in (workdir / "checkpoints" / "8" / "state").rglob("*") if p.is_file()]
    largest = max(files, key=lambda p: p.stat().st_size)
    largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])
    out = cli.run(_args(workdir, data_dir), devices=1)[0]
    assert "checkpoint at step 8" in out and "cannot be restored" in out, out[-3000:]
    assert "set the unreadable checkpoint of step 8 aside" in out and "resumed from step 4" in out
    assert cli.checkpoint_steps(workdir) == [4, 8] and (workdir / "checkpoints" / "8.unreadable").is_dir()
    cli.assert_same_training(cli.rows(workdir), cli.rows(reference))  # same topology: bit for bit
    assert cli.summary(workdir)["finished"] and cli.summary(workdir)["eval"] == cli.summary(reference)["eval"]


def test_a_diverging_run_stops_naming_the_step_and_never_saves_that_state(tmp_path, data_dir):
    workdir = tmp_path / "run"
    [(code, out)] = cli.finish(cli.start(_args(workdir, data_dir, "--config.optimizer.lr=1e30",
                                               "--config.checkpoint_every=1"), devices=1))
    assert code != 0 and "Traceback" not in out, out[-3000:]
    last = out.strip().splitlines()[-1]
    assert last.startswith("train.py: error: non-finite value at step "), last
    bad = int(last.split("at step ")[1].split(":")[0])
    assert "stopped without saving this state" in last
    assert cli.checkpoint_steps(workdir) and max(cli.checkpoint_steps(workdir)) == bad - 1
    assert max(r["step"] for r in cli.rows(workdir)) == bad - 1  # the bad step's row is not logged either
