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


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).replace("\\n", " ").replace("\\'", "'").split())
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


def _parse(argv: list[str]) -> None:
    for arg in argv[1:]:  # config_flags loads the file lazily; say plainly when it is not there
        path = arg.split("=", 1)[1] if arg.startswith("--config=") else None
        if arg == "--config" and argv.index(arg) + 1 < len(argv):
            path = argv[argv.index(arg) + 1]
        if path and not os.path.exists(path.split(":", 1)[0]):
            sys.exit(f"train.py: error: config file {path!r} not found (the configs are in configs/)")
    try:
        flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, ValueError, TypeError, OSError) as e:
        msg = _one_line(e)
        if "Did you mean" in msg or isinstance(e, (AttributeError, KeyError)):
            msg = f"unknown config key: {msg} (see the config file for the valid keys)"
        elif msg.startswith("Could not parse") and re.search(r"\.\d+(\.|'|$)", msg):
            msg += "; a list item is addressed by its index in brackets, e.g. --config.distill[0].loss=cwd"
        sys.exit(f"train.py: error: {msg}")
    if _CONFIG.value is None or _WORKDIR.value is None:
        sys.exit("train.py: error: both --config configs/NAME.py and --workdir DIR are required")


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
        sys.exit(f"train.py: error: {_one_line(e)}")


if __name__ == "__main__":
    main(sys.argv)
