"""Runs a config: one training run, or a comparison made of several (`phases`).

A config with `phases` (e.g. the demo: teacher, student alone, student with
CanKD) trains each phase in `workdir/<phase>` with the phase's overrides, in
order, each resumable on its own, then writes `workdir/summary.json` with the
held-out metric of every phase and prints it as a table.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from typing import Any

import jax
import ml_collections

log = logging.getLogger(__name__)


def phase_config(config: ml_collections.ConfigDict, phase: str, workdir: str) -> ml_collections.ConfigDict:
    """The config of one phase: the base with `phase_overrides[phase]` applied.

    The string `{workdir}` in a teacher checkpoint path is the comparison's
    workdir, so a later phase can name an earlier phase's export.
    """
    cfg = copy.deepcopy(config.to_dict())
    overrides = cfg.pop("phase_overrides", {}).get(phase, {})
    cfg.pop("phases", None)
    _merge(cfg, overrides)
    if cfg.get("teacher") and cfg["teacher"].get("checkpoint"):
        cfg["teacher"]["checkpoint"] = cfg["teacher"]["checkpoint"].format(workdir=workdir)
    return ml_collections.ConfigDict(cfg)


def _merge(base: dict, overrides: dict) -> None:
    for k, v in overrides.items():
        # A block that names another network (a Faster R-CNN Swin teacher phase over a RetinaNet R18 student)
        # replaces the base's: merging would leave the other network's options in it.
        both = isinstance(v, dict) and isinstance(base.get(k), dict)
        if both and not ("name" in v and v["name"] != base[k].get("name")):
            _merge(base[k], v)
        else:
            base[k] = v


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    # Imported here: `phase_config` alone (benchmarks) needs no data pipeline, checkpointing or logging libraries.
    from cankd_jax.train.preemption import Preemption
    from cankd_jax.train.trainer import train_and_evaluate

    if not config.get("phases"):
        summary = train_and_evaluate(config, workdir)
        _print_table({"run": summary}, summary["metric"])
        return summary
    results = {}
    # One notice handler for every phase: a SIGTERM or Ctrl-C during a phase's final evaluation or export (after
    # its last step) would otherwise be forgotten, and the next phase would train in full.
    with Preemption() as preempt:
        for i, phase in enumerate(config.phases):
            cfg = phase_config(config, phase, workdir)
            results[phase] = train_and_evaluate(cfg, os.path.join(workdir, phase), preempt)
            later = ", ".join(config.phases[i + 1:]) or "anything else"
            if not results[phase].get("finished"):
                # Preempted: stop here, as every process does; the next start resumes this phase, and the later
                # ones (which may read its export) run after it.
                log.warning("phase %r stopped at step %s of %s; not starting %s: run the same command again to "
                            "resume", phase, results[phase].get("step"), cfg.total_steps, later)
                return {"metric": results[phase].get("metric"), "stopped": phase}
            if preempt.requested and i + 1 < len(config.phases):
                log.warning("phase %r finished, then a notice to stop came; not starting %s: run the same command "
                            "again to go on", phase, later)
                return {"metric": results[phase].get("metric"), "stopped": config.phases[i + 1]}
    metric = config.get("metric") or next(iter(results.values()))["metric"]
    summary: dict[str, Any] = {"metric": metric}
    for phase, res in results.items():
        summary[phase] = res.get("eval", {}).get(metric)
    summary["phases"] = {p: {"workdir": r["workdir"], "eval": r.get("eval"), "steps": r.get("step")}
                         for p, r in results.items()}
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    _print_table(results, metric)
    return summary


def _print_table(results: dict[str, dict], metric: str) -> None:
    if jax.process_index() != 0:
        return
    print(f"\n| run | steps | held-out {metric} |\n|---|---|---|")
    for name, res in results.items():
        value = res.get("eval", {}).get(metric)
        shown = f"{100 * value:.2f}" if isinstance(value, float) else "-"
        print(f"| {name} | {res.get('step', '-')} | {shown} |")
