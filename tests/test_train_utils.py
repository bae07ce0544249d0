"""Optimizer recipes and the Orbax checkpointer."""

from __future__ import annotations

import logging
import os

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cankd_jax.train.checkpoint import Checkpointer
from cankd_jax.train.optim import make_optimizer, make_schedule


def _cfg(**kw):
    return ml_collections.ConfigDict(kw)


def test_poly_schedule_is_mmseg_polylr():
    s = make_schedule(_cfg(lr=0.01, schedule="poly", power=0.9, min_lr=1e-4), total_steps=80_000)
    for t in (0, 1, 40_000, 79_999, 80_000):
        expected = (0.01 - 1e-4) * (1 - t / 80_000) ** 0.9 + 1e-4
        np.testing.assert_allclose(float(s(t)), expected, rtol=1e-5)


def test_warmup_then_steps_is_the_detection_recipe():
    s = make_schedule(_cfg(lr=0.005, schedule="step", boundaries=(1000, 2000), warmup_steps=500, warmup_factor=0.001),
                      total_steps=3000)
    np.testing.assert_allclose(float(s(0)), 0.005 * 0.001, rtol=1e-4)  # float32 schedule arithmetic
    np.testing.assert_allclose(float(s(250)), 0.005 * (0.001 + 0.999 * 0.5), rtol=1e-5)
    np.testing.assert_allclose([float(s(t)) for t in (500, 999, 1000, 1999, 2000)],
                               [0.005, 0.005, 0.0005, 0.0005, 0.00005], rtol=1e-5)


def test_sgd_chain_matches_pytorch_sgd():
    torch = pytest.importorskip("torch")
    w0 = np.random.default_rng(0).standard_normal((5,)).astype(np.float32)
    grads = [np.random.default_rng(i).standard_normal((5,)).astype(np.float32) * 30 for i in range(1, 4)]
    tx, _ = make_optimizer(_cfg(name="sgd", lr=0.1, momentum=0.9, weight_decay=1e-2, grad_clip_norm=35.0), 10)
    p, st = jnp.asarray(w0), None
    st = tx.init(p)
    tp = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    topt = torch.optim.SGD([tp], lr=0.1, momentum=0.9, weight_decay=1e-2)
    for g in grads:
        upd, st = tx.update(jnp.asarray(g), st, p)
        p = optax.apply_updates(p, upd)
        tp.grad = torch.from_numpy(g.copy())
        torch.nn.utils.clip_grad_norm_([tp], 35.0)
        topt.step()
    np.testing.assert_allclose(np.asarray(p), tp.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_adamw_with_a_backbone_lr_mult_matches_pytorch_param_groups():
    """DINO's recipe: AdamW lr 1e-4, weight decay 1e-4, global clip 0.1, the backbone at 0.1x lr (mmengine's
    custom_keys). PyTorch: one clip over every parameter, then AdamW with the backbone in a group of lr 1e-5
    (its decoupled decay scaled with it). The distillation terms' parameters keep the base lr even when their
    names contain the key."""
    import torch

    rng = np.random.default_rng(0)
    shapes = {"backbone": (4, 3), "neck": (5,), "distill": (3,)}
    w0 = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    grads = [{k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()} for _ in range(5)]
    cfg = _cfg(name="adamw", lr=1e-4, weight_decay=1e-4, grad_clip_norm=0.1, lr_mult={"backbone": 0.1, "bone": 0.5})
    tx, _ = make_optimizer(cfg, 10)

    def tree(d):
        return {"student": {"backbone": {"conv": {"kernel": d["backbone"]}}, "neck": {"bias": d["neck"]}},
                "distill": {"cankd_backbone_p3": {"w": d["distill"]}}}

    p = jax.tree.map(jnp.asarray, tree(w0))
    st = tx.init(p)
    tp = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in w0.items()}
    topt = torch.optim.AdamW([{"params": [tp["backbone"]], "lr": 1e-5}, {"params": [tp["neck"], tp["distill"]]}],
                             lr=1e-4, weight_decay=1e-4)
    for g in grads:
        upd, st = tx.update(jax.tree.map(jnp.asarray, tree(g)), st, p)
        p = optax.apply_updates(p, upd)
        for k, t in tp.items():
            t.grad = torch.from_numpy(g[k].copy())
        torch.nn.utils.clip_grad_norm_(list(tp.values()), 0.1)
        topt.step()
    ours = {"backbone": p["student"]["backbone"]["conv"]["kernel"], "neck": p["student"]["neck"]["bias"],
            "distill": p["distill"]["cankd_backbone_p3"]["w"]}
    for k, t in tp.items():
        np.testing.assert_allclose(np.asarray(ours[k]), t.detach().numpy(), rtol=1e-6, atol=1e-7, err_msg=k)
        assert not np.allclose(np.asarray(ours[k]), w0[k])
    with pytest.raises(ValueError, match="non-negative factors"):
        make_optimizer(_cfg(name="adamw", lr=1e-4, lr_mult={"backbone": -1.0}), 10)


def test_frozen_parameters_get_no_update_at_all():
    params = {"stem": jnp.ones((3,)), "head": jnp.ones((3,))}
    labels = {"stem": "frozen", "head": "trainable"}
    tx, _ = make_optimizer(_cfg(name="sgd", lr=0.1, momentum=0.9, weight_decay=0.1), 10, frozen_labels=labels)
    st = tx.init(params)
    g = {"stem": jnp.full((3,), 2.0), "head": jnp.full((3,), 2.0)}
    for _ in range(3):
        upd, st = tx.update(g, st, params)
        params = optax.apply_updates(params, upd)
    np.testing.assert_array_equal(params["stem"], 1.0)
    assert not np.allclose(params["head"], 1.0)


def test_unknown_schedule_and_optimizer_are_named():
    with pytest.raises(ValueError, match="unknown optimizer.schedule 'linear'"):
        make_schedule(_cfg(lr=0.1, schedule="linear"), 10)
    with pytest.raises(ValueError, match="unknown optimizer.name 'lamb'"):
        make_optimizer(_cfg(name="lamb", lr=0.1), 10)


def _state(sharding):
    w = jnp.arange(32.0).reshape(8, 4)
    return {"w": jax.device_put(w, sharding), "step": jnp.asarray(3, jnp.int32),
            "rng": jax.random.key_data(jax.random.key(5))}


def test_checkpoint_round_trip_onto_another_mesh(tmp_path):
    assert jax.device_count() >= 4
    mesh4 = Mesh(np.array(jax.devices()[:4]), ("data",))
    ck = Checkpointer(str(tmp_path / "ck"), max_to_keep=2)
    state = _state(NamedSharding(mesh4, P("data")))
    ck.save(4, state, {"data_position": "abc"})
    ck.save(8, jax.tree.map(lambda x: x + 1, state), {"data_position": "def"})
    ck.save(12, jax.tree.map(lambda x: x + 2, state), {"data_position": "ghi"})
    ck.wait()
    assert ck.steps() == [8, 12]  # keeps the newest two
    mesh1 = Mesh(np.array(jax.devices()[:1]), ("data",))
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh1, P())), state)
    step, restored, data = Checkpointer(str(tmp_path / "ck")).restore_latest(target)
    assert step == 12 and data == {"data_position": "ghi"}
    chex.assert_trees_all_equal(restored, jax.device_get(jax.tree.map(lambda x: x + 2, state)))  # w, step and rng
    assert restored["w"].sharding == NamedSharding(mesh1, P())


def test_corrupt_latest_checkpoint_falls_back_with_a_warning(tmp_path, caplog):
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    ck = Checkpointer(str(tmp_path / "ck"), async_save=False)
    state = _state(NamedSharding(mesh, P()))
    ck.save(4, state, {"pos": 4})
    ck.save(8, jax.tree.map(lambda x: x + 1, state), {"pos": 8})
    ck.close()
    # Damage every file of step 8's state item, as a bad disk would (a crash mid-save leaves no finished step:
    # Orbax finalises a step by an atomic rename; tests/test_train_e2e.py kills a run for real).
    for root, _, files in os.walk(tmp_path / "ck" / "8" / "state"):
        for f in files:
            with open(os.path.join(root, f), "wb") as fh:
                fh.write(b"\0garbage")
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P())), state)
    with caplog.at_level(logging.WARNING):
        ck = Checkpointer(str(tmp_path / "ck"), async_save=False)
        step, restored, data = ck.restore_latest(target)
    assert step == 4 and data == {"pos": 4}
    chex.assert_trees_all_equal(restored, jax.device_get(state))
    assert any("step 8" in r.getMessage() and "older" in r.getMessage() for r in caplog.records)
    # Set aside (kept for a person, no longer a step), so the run that trains on can save step 8 again.
    assert any("set the unreadable checkpoint of step 8 aside" in r.getMessage() for r in caplog.records)
    assert sorted(os.listdir(tmp_path / "ck")) == ["4", "8.unreadable"] and ck.steps() == [4]
    ck.save(8, jax.tree.map(lambda x: x + 2, state), {"pos": 8})
    ck.close()
    step, restored, _ = Checkpointer(str(tmp_path / "ck")).restore_latest(target)
    assert step == 8
    chex.assert_trees_all_equal(restored, jax.device_get(jax.tree.map(lambda x: x + 2, state)))


def test_a_relative_directory_saves_and_restores_where_the_process_started(tmp_path, monkeypatch):
    """`train.py --workdir runs/x` (relative): Orbax's array writer refuses relative paths at the first save."""
    monkeypatch.chdir(tmp_path)
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    state = _state(NamedSharding(mesh, P()))
    ck = Checkpointer(os.path.join("runs", "x", "checkpoints"), async_save=False)
    ck.save(2, state, {"pos": 2})
    ck.close()
    monkeypatch.chdir(tmp_path / "runs")  # a later process elsewhere reads it by its absolute path
    assert ck.directory == str(tmp_path / "runs" / "x" / "checkpoints")
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P())), state)
    step, restored, data = Checkpointer(ck.directory).restore_latest(target)
    assert step == 2 and data == {"pos": 2}
    chex.assert_trees_all_equal(restored, jax.device_get(state))


def test_a_checkpoint_of_another_state_is_an_error_and_stays(tmp_path):
    """A workdir whose checkpoints another model or optimizer wrote: an error that names the arrays that differ,
    with nothing set aside (setting them aside would start the run again from step 0 beside the old run's files)."""
    from cankd_jax.train.checkpoint import CheckpointMismatch

    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    sharding = NamedSharding(mesh, P())
    state = _state(sharding)
    ck = Checkpointer(str(tmp_path / "ck"), async_save=False)
    ck.save(4, state, {"pos": 4})
    ck.close()

    def spec(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    wider = dict(jax.tree.map(spec, state), w=jax.ShapeDtypeStruct((8, 5), jnp.float32, sharding=sharding))
    with pytest.raises(CheckpointMismatch, match=r"step 4 .*\(1 array\(s\) of another shape, e.g. w: saved \(8, 4\), "
                                                 r"built \(8, 5\).*new --workdir"):
        Checkpointer(str(tmp_path / "ck")).restore_latest(wider)
    other = {"w": spec(state["w"]), "step": spec(state["step"]), "rng": spec(state["rng"]),
             "mu": {"w": spec(state["w"])}}
    with pytest.raises(CheckpointMismatch, match=r"1 array\(s\) built but not saved, e.g. mu/w"):
        Checkpointer(str(tmp_path / "ck")).restore_latest(other)
    assert sorted(os.listdir(tmp_path / "ck")) == ["4"]
    step, restored, _ = Checkpointer(str(tmp_path / "ck")).restore_latest(jax.tree.map(spec, state))
    assert step == 4
    chex.assert_trees_all_equal(restored, jax.device_get(state))


def test_no_checkpoint_gives_none(tmp_path):
    assert Checkpointer(str(tmp_path / "empty")).restore_latest({"w": jnp.zeros(2)}) is None


def test_test_fault_parses_and_names_a_malformed_value(monkeypatch):
    import signal

    from cankd_jax.train import trainer

    monkeypatch.delenv(trainer.FAULT_ENV, raising=False)
    assert trainer._fault() == (0, -1)
    monkeypatch.setenv(trainer.FAULT_ENV, "SIGKILL@5")
    assert trainer._fault() == (signal.SIGKILL, 5)
    for bad in ("SIGKILL", "SIGNOPE@3", "SIGTERM@x"):
        monkeypatch.setenv(trainer.FAULT_ENV, bad)
        with pytest.raises(ValueError, match="expected SIGNAME@STEP"):
            trainer._fault()


def test_a_preempted_phase_ends_the_comparison(tmp_path, monkeypatch):
    """SIGTERM during one phase of a multi-phase config stops the run there (the next start resumes that phase):
    the later phases do not start, and no summary.json claims the comparison finished."""
    import ml_collections

    from cankd_jax.train import runner, trainer

    calls = []

    def fake(cfg, workdir, preempt=None):
        calls.append(os.path.basename(workdir))
        finished = calls[-1] != "student"  # preempted in the second phase
        return {"metric": "mIoU", "finished": finished, "step": 5 if not finished else cfg.total_steps,
                "eval": {"mIoU": 0.5}, "workdir": workdir}

    monkeypatch.setattr(trainer, "train_and_evaluate", fake)
    config = ml_collections.ConfigDict(dict(total_steps=10, metric="mIoU", phases=["teacher", "student", "cankd"],
                                            phase_overrides={}))
    out = runner.run(config, str(tmp_path))
    assert calls == ["teacher", "student"] and out["stopped"] == "student"
    assert not (tmp_path / "summary.json").exists()
    calls.clear()
    monkeypatch.setattr(trainer, "train_and_evaluate", lambda cfg, workdir, preempt=None: (calls.append(workdir), {
        "metric": "mIoU", "finished": True, "step": 10, "eval": {"mIoU": 0.5}, "workdir": workdir})[1])
    assert runner.run(config, str(tmp_path))["cankd"] == 0.5 and len(calls) == 3
    assert (tmp_path / "summary.json").exists()


def test_a_notice_after_a_phase_s_last_step_stops_the_comparison_before_the_next(tmp_path, monkeypatch):
    """Ctrl-C while the teacher phase evaluates and exports (after its last step, so it finishes): the phases
    share one notice handler, and the student phase does not start (it used to train in full)."""
    import signal

    import ml_collections

    from cankd_jax.train import runner, trainer

    calls = []

    def fake(cfg, workdir, preempt=None):
        calls.append(os.path.basename(workdir))
        if calls[-1] == "teacher":
            os.kill(os.getpid(), signal.SIGINT)  # during the final evaluation
        return {"metric": "mIoU", "finished": True, "step": 10, "eval": {"mIoU": 0.5}, "workdir": workdir}

    monkeypatch.setattr(trainer, "train_and_evaluate", fake)
    config = ml_collections.ConfigDict(dict(total_steps=10, metric="mIoU", phases=["teacher", "student", "cankd"],
                                            phase_overrides={}))
    out = runner.run(config, str(tmp_path))
    assert calls == ["teacher"] and out["stopped"] == "student"
    assert not (tmp_path / "summary.json").exists()


@pytest.mark.parametrize("key, value, least", [("eval_every", 0, 1), ("log_every", 0, 1), ("checkpoint_every", -2, 1),
                                               ("keep_checkpoints", 0, 1), ("batch_size", 0, 1),
                                               ("total_steps", -3, 0)])
def test_loop_counts_out_of_range_are_named_before_any_work(tmp_path, key, value, least):
    """Before: a ZeroDivisionError at the first step (the *_every keys at 0), a run that trained nothing (negative
    total_steps) or kept no checkpoint (keep_checkpoints=0). Now the key, before the workdir is even made."""
    from cankd_jax.config_arg import load_config
    from cankd_jax.train.trainer import train_and_evaluate

    config = load_config(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                                      "smoke.py"))
    config[key] = value
    with pytest.raises(ValueError, match=rf"--config.{key}={value}: must be an integer >= {least} \("):
        train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()



def test_ctrl_c_asks_for_a_save_and_a_second_one_interrupts():
    """One process: the first SIGINT is a preemption notice (save at the end of the step, then stop), the second a
    KeyboardInterrupt; leaving, the handlers before are put back."""
    import signal

    from cankd_jax.train.preemption import Preemption

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with Preemption() as preempt:
        assert not preempt.reached(1)
        os.kill(os.getpid(), signal.SIGINT)
        assert preempt.reached(1)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            signal.getsignal(signal.SIGINT)  # Python runs the handler between bytecodes: give it one
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_a_sigint_a_launcher_set_to_ignore_stays_ignored():
    """A launcher that runs the job with SIGINT ignored (nohup-style, or `signal.SIG_IGN` in a wrapper) keeps it so:
    a Ctrl-C reaching the process is neither a notice nor an interrupt. SIGTERM still is."""
    import signal

    from cankd_jax.train.preemption import Preemption

    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with Preemption() as preempt:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)
            signal.getsignal(signal.SIGINT)  # a bytecode boundary, where a handler would run
            assert not preempt.reached(1) and not preempt.requested
            os.kill(os.getpid(), signal.SIGTERM)
            signal.getsignal(signal.SIGINT)
            assert preempt.reached(1)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)
