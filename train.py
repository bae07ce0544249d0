"""Train a network, or distill a student from a teacher, as a config describes.

    python train.py --config configs/NAME.py --workdir DIR [--config.key=value ...]

Re-running the same command on the same DIR resumes from its newest checkpoint;
a finished run only reports. Multi-host: pass --coordinator_address,
--num_processes and --process_id (or let JAX detect TPU/SLURM environments).
"""

from __future__ import annotations

import logging
import os
import re
import sys

from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file (configs/NAME.py)", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics and exports")
_COORD = flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-host runs")
_NPROC = flags.DEFINE_integer("num_processes", None, "number of processes in a multi-host run")
_PID = flags.DEFINE_integer("process_id", None, "index of this process in a multi-host run")


def _one_line(e: BaseException, *, unquote: bool = True) -> str:
    """`e`'s message on one line. `unquote`: undo the quoting config_flags adds to a parse error (a KeyError's
    message comes quoted, twice); the trainer's own messages keep their quotes ("'x.pth' is not ... b''")."""
    text = " ".join(str(e).replace("\\n", " ").replace("\\'", "'").split())
    if not unquote:
        return text or type(e).__name__
    if "Traceback (most recent call last)" in text:  # config_flags embeds get_config's traceback: keep its message
        text = re.split(r"\b\w*(?:Error|Exception): ", text)[-1]
    text = text.replace("' Did you mean", " Did you mean").strip()
    # A KeyError's message comes quoted (twice, through config_flags), and the cuts above can leave one quote
    # unpaired; the message's own quoted items ("got 'heads=pspnet'") keep theirs.
    while len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1]
    for q in "'\"":
        if text.count(q) % 2 and text.endswith(q):
            text = text[:-1]
        if text.count(q) % 2 and text.startswith(q):
            text = text[1:]
    return text or type(e).__name__


def out_of_memory(e: BaseException) -> str | None:
    """The one-line error for a device that ran out of memory (XLA's RESOURCE_EXHAUSTED): XLA's figure and what
    to change, rather than its traceback. None for any other error."""
    if "RESOURCE_EXHAUSTED" not in str(e):
        return None
    return (f"out of memory on the device ({_one_line(e, unquote=False)[:300]}); lower --config.batch_size or the "
            "input size (data.crop_size), or try --config.dtype=bfloat16, --config.remat=nothing_saveable or "
            "--config.mesh.fsdp=True")


def _config_path(argv: list[str]) -> str:
    """The value of --config in `argv` ('' if none)."""
    for i, arg in enumerate(argv[1:], 1):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return ""


def _parse(argv: list[str]) -> None:
    path = _config_path(argv)  # config_flags loads the file lazily; say plainly when it is not there
    file = path.split(":", 1)[0]
    if path and not os.path.exists(file):
        sys.exit(f"train.py: error: config file {path!r} not found (the configs are in configs/)")
    if path and not os.path.isfile(file):
        sys.exit(f"train.py: error: config file {path!r} is not a file (give one of configs/*.py)")
    try:
        flags.FLAGS(argv)
    except flags.UnrecognizedFlagError as e:
        name = getattr(e, "flagname", "") or ""
        if name.startswith("config."):
            sys.exit(f"train.py: error: unknown config key: {name[len('config.'):]} "
                     "(see the config file for the valid keys)")
        sys.exit(f"train.py: error: {_one_line(e)} (train.py takes --config, --workdir, --coordinator_address, "
                 "--num_processes, --process_id, and config keys as --config.KEY=VALUE)")
    except (flags.Error, AttributeError, KeyError, ValueError, TypeError, OSError, IndexError) as e:
        msg = _one_line(e)
        if isinstance(e, AttributeError) and "get_config" in msg:
            msg = f"the config file defines no get_config(arg) ({msg})"
        elif isinstance(e, IndexError):
            indexed = [a.split("=", 1)[0] for a in argv[1:] if re.match(r"--config\.\S*\[\d+\]", a)]
            msg = f"{', '.join(indexed) or 'a list index'}: {msg} (count list items from 0)"
        elif "Did you mean" in msg or isinstance(e, (AttributeError, KeyError)):
            msg = f"unknown config key: {msg} (see the config file for the valid keys)"
        elif msg.startswith("Could not parse") and re.search(r"\.\d+(\.|'|$)", msg):
            msg += "; a list item is addressed by its index in brackets, e.g. --config.distill[0].loss=cwd"
        sys.exit(f"train.py: error: {msg}")
    except Exception as e:  # noqa: BLE001 - the config file's own code failed (a syntax error, an import, a raise)
        sys.exit(f"train.py: error: the config file {_config_path(argv)!r} failed to load: "
                 f"{type(e).__name__}: {_one_line(e, unquote=False)}")
    if _CONFIG.value is None and _config_path(argv):
        sys.exit(f"train.py: error: get_config in {_config_path(argv)!r} returned None; it must return the "
                 "run's ml_collections.ConfigDict")
    if _CONFIG.value is None or _WORKDIR.value is None:
        sys.exit("train.py: error: both --config configs/NAME.py and --workdir DIR are required")
    if not _WORKDIR.value.strip():
        sys.exit("train.py: error: --workdir is empty; give the directory for checkpoints, metrics and exports")


def main(argv: list[str]) -> None:
    _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from absl import logging as absl_logging  # noqa: PLC0415

    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every file it writes at INFO
    from cankd_jax.train import distributed  # noqa: PLC0415 - after flag parsing, so --help and flag errors are instant

    try:
        distributed.initialize(_COORD.value, _NPROC.value, _PID.value)
        from cankd_jax.train.runner import run  # noqa: PLC0415 - nothing may touch a JAX backend before initialize

        run(_CONFIG.value, _WORKDIR.value)
    except (ValueError, FileNotFoundError, distributed.DistributedSetupError, distributed.ProcessesDisagree,
            FloatingPointError) as e:
        # Configuration, input and setup mistakes, processes that disagree, a diverged run (FloatingPointError:
        # the trainer's non-finite check): one line that says what happened, not a traceback.
        sys.exit(f"train.py: error: {_one_line(e, unquote=False)}")
    except Exception as e:
        message = out_of_memory(e)
        if message is None:
            raise
        sys.exit(f"train.py: error: {message}")


if __name__ == "__main__":
    main(sys.argv)
