"""Joining a multi-process job: from explicit flags, or from a cluster that announces itself.

`initialize(...)` returns quietly on a plain machine (one process), initialises
JAX's distributed runtime for an explicit `--coordinator_address/--num_processes/
--process_id` or for an environment JAX recognises (TPU pods, complete SLURM
`srun` steps, Open MPI, ...), and turns every failure into a `DistributedSetupError`
with a one-line message: never a traceback, and never a silent single-process run
inside what looks like a multi-task job.
"""

from __future__ import annotations

import errno
import itertools
import json
import logging
import os
import socket
from typing import Any, Optional

import jax
import numpy as np

log = logging.getLogger(__name__)

# What JAX needs from SLURM to place a process (jax/_src/clusters/slurm_cluster.py); srun sets them all.
_SLURM_STEP_VARS = ("SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


_BARRIERS = itertools.count()


class DistributedSetupError(RuntimeError):
    """The multi-process setup cannot proceed; the message says why and what to pass instead."""


class ProcessesDisagree(RuntimeError):
    """The processes of a job cannot take a decision together (e.g. one cannot read the chosen checkpoint)."""


def _partial_slurm() -> Optional[str]:
    """A description of a SLURM job whose step variables are incomplete, or None."""
    if "SLURM_JOB_ID" not in os.environ:
        return None
    missing = [v for v in _SLURM_STEP_VARS if v not in os.environ]
    return f"SLURM_JOB_ID is set but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not" if missing else None


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None) -> None:
    """Join the job the flags (or else the environment) describe; one process when there is none."""
    explicit = coordinator_address is not None or num_processes is not None or process_id is not None
    if explicit:
        if num_processes == 1 and coordinator_address is None:
            return  # asked for one process on purpose (e.g. inside a SLURM allocation, outside srun)
        missing = [f"--{n}" for n, v in (("coordinator_address", coordinator_address),
                                         ("num_processes", num_processes), ("process_id", process_id)) if v is None]
        if missing:
            raise DistributedSetupError(f"a multi-process run needs {', '.join(missing)} as well "
                                        "(or none of these flags, to let a TPU pod / SLURM / MPI job be detected)")
        _check_address(coordinator_address)
        if process_id == 0:
            _check_port_free(coordinator_address)
        try:
            jax.distributed.initialize(coordinator_address, num_processes, process_id)
        except Exception as e:  # noqa: BLE001 - any failure: one line naming the flags
            raise DistributedSetupError(f"cannot join the job at {coordinator_address} as process {process_id} of "
                                        f"{num_processes}: {type(e).__name__}: {_first_line(e)}") from None
        return

    partial = _partial_slurm()
    try:
        jax.distributed.initialize()
    except ValueError as e:
        if "coordinator_address should be defined" not in str(e):
            raise DistributedSetupError(f"multi-host auto-detection failed: {_first_line(e)}; pass "
                                        "--coordinator_address, --num_processes and --process_id") from None
        # No cluster was detected: a plain machine, one process.
        if partial:
            raise DistributedSetupError(
                f"{partial} (not inside `srun`?), so this job's processes cannot find each other; run the "
                "command under srun, pass --coordinator_address, --num_processes and --process_id, or pass "
                "--num_processes=1 to train as one process") from None
    except Exception as e:  # noqa: BLE001 - a detected cluster whose description is broken
        raise DistributedSetupError(f"multi-host auto-detection failed ({type(e).__name__}: {_first_line(e)}); "
                                    "pass --coordinator_address, --num_processes and --process_id, or "
                                    "--num_processes=1 to train as one process") from None
    else:
        log.info("joined a %d-process job as process %d", jax.process_count(), jax.process_index())


def _check_address(address: str) -> None:
    """`host:port` with a port in 1..65535: else JAX indexes past a missing port, or its service waits forever
    on one out of range."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise DistributedSetupError(f"--coordinator_address={address!r} must be HOST:PORT with a port in 1..65535, "
                                    "e.g. 10.0.0.1:1234 (process 0's host)")


def _check_port_free(address: str) -> None:
    """Process 0 serves the job at the address's port: one already taken on this host (another job's coordinator)
    made JAX crash (a segmentation fault, no message). Tried as JAX binds it, on every interface."""
    port = int(address.rpartition(":")[2])
    for family, host in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError:  # no IPv6 on this host: the IPv4 wildcard
            continue
        with sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free to JAX too
            if family == socket.AF_INET6:  # both families, whatever net.ipv6.bindv6only says
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            try:
                sock.bind((host, port))
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise DistributedSetupError(
                        f"port {port} of --coordinator_address={address} is already in use on this host (another "
                        "job's coordinator?); process 0 serves the job there: choose a free port") from None
                continue
            return


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


def barrier(name: str, *, timeout_s: int = 3600) -> None:
    """Wait until every process of the job reaches `name` (no-op for one process).

    Through the coordination service, not a collective: JAX's CPU collectives give
    up when the processes reach their first collective more than 30 s apart, which
    uneven start-up work (process 0 alone opens the metrics files) can cause.
    """
    if jax.process_count() > 1:
        from orbax.checkpoint import multihost  # noqa: PLC0415 - only multi-process runs need it

        # Barrier ids cannot be reused; every process passes the same barriers in the same order.
        multihost.sync_global_processes(f"cankd_jax:{name}:{next(_BARRIERS)}", timeout=timeout_s)


def each_process(flag: bool) -> np.ndarray:
    """`(process_count,)` bool: each process's `flag`, on every process (a collective: every process calls it)."""
    if jax.process_count() == 1:
        return np.array([flag])
    from jax.experimental import multihost_utils  # noqa: PLC0415 - as `barrier`'s import: multi-process runs only

    return np.asarray(multihost_utils.process_allgather(np.array(flag))).reshape(-1).astype(bool)


def broadcast_bytes(data: bytes) -> bytes:
    """Process 0's `data`, on every process (a collective: every process calls it, with data of any length)."""
    if jax.process_count() == 1:
        return data
    from jax.experimental import multihost_utils  # noqa: PLC0415

    size = int(multihost_utils.broadcast_one_to_all(np.int32(len(data))))
    buf = np.zeros((max(size, 1),), np.uint8)
    mine = np.frombuffer(data, np.uint8)[:size]
    buf[:mine.size] = mine
    return np.asarray(multihost_utils.broadcast_one_to_all(buf))[:size].tobytes()


def each_process_text(text: str, *, limit: int = 600) -> list[str]:
    """Each process's `text` (cut to `limit` UTF-8 bytes), on every process (a collective)."""
    raw = text.encode()[:limit]
    if jax.process_count() == 1:
        return [raw.decode(errors="ignore")]
    from jax.experimental import multihost_utils  # noqa: PLC0415

    buf = np.zeros((limit + 4,), np.uint8)
    buf[:4] = np.frombuffer(np.int32(len(raw)).tobytes(), np.uint8)
    buf[4:4 + len(raw)] = np.frombuffer(raw, np.uint8)
    rows = np.asarray(multihost_utils.process_allgather(buf)).reshape(jax.process_count(), -1)
    return [row[4:4 + int(np.frombuffer(row[:4].tobytes(), np.int32)[0])].tobytes().decode(errors="ignore")
            for row in rows]


def flat_config(config: Any) -> dict[str, Any]:
    """`{'optimizer.lr': 0.01, 'distill[0].weight': 1.0, ...}`: a config (ConfigDict or dict, blocks in lists
    included) as dotted keys and JSON values (tuples as lists), so a config and its JSON copy compare equal."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if hasattr(node, "to_dict"):
            node = node.to_dict()
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        elif isinstance(node, (list, tuple)) and node and any(isinstance(v, dict) or hasattr(v, "to_dict")
                                                             for v in node):
            for i, v in enumerate(node):
                walk(v, f"{prefix}[{i}]")
        else:
            out[prefix] = json.loads(json.dumps(node, default=str))

    walk(config, "")
    return out


def config_differences(mine: dict[str, Any], theirs: dict[str, Any], *, ignore: tuple[str, ...] = ()) -> list[str]:
    """`key: theirs -> mine` for every dotted key whose value differs (a key one side lacks shows as `unset`),
    keys under an `ignore` prefix left out. Values compare as JSON text (NaN equals NaN)."""
    out = []
    for key in sorted(set(mine) | set(theirs)):
        if any(key == p or key.startswith((p + ".", p + "[")) for p in ignore):
            continue
        a, b = (json.dumps(side[key], sort_keys=True) if key in side else "unset" for side in (theirs, mine))
        if a != b:
            out.append(f"{key}: {a} -> {b}")
    return out


# Keys that may differ between the hosts of one job: where each finds its files, and how many reader processes
# it starts (the batches do not depend on that). The files' contents are the same (or the run says otherwise).
HOST_LOCAL = ("data.data_dir", "data.index_cache", "data.workers", "teacher.checkpoint", "student.pretrained",
              "student.inherit")


def check_same_config(config: Any) -> None:
    """Raise `ProcessesDisagree` on every process when any process was given another config than process 0
    (another `--config.lr` on one host trains an inconsistent state; another `total_steps` fails later on a
    barrier). The message names the keys, with process 0's value and the other's. `HOST_LOCAL` keys (paths,
    reader counts) are not compared. Call it before any check one process could fail alone: the others would
    wait for it in this collective."""
    if jax.process_count() == 1:
        return
    mine = flat_config(config)
    theirs = json.loads(broadcast_bytes(json.dumps(mine, sort_keys=True).encode()))
    differ = config_differences(mine, theirs, ignore=HOST_LOCAL)
    texts = each_process_text("; ".join(differ))
    bad = [i for i, t in enumerate(texts) if t]
    if bad:
        raise ProcessesDisagree(f"process(es) {bad} were given another config than process 0 (process 0's value -> "
                                f"theirs): {texts[bad[0]]}; start every process with the same config and overrides")
