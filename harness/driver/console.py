"""What a sweep prints: its own lines on the terminal, everything else (Ray, Ray Train, DeepSpeed, datasets,
worker output) in ``sweep.log`` in the run directory.

Verbosity: ``-q`` shows warnings and the final table only, the default shows the sweep's progress, ``-v``
also lets every library and worker line through to the terminal, as before.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path
from typing import IO, Iterator

NOISY_LOGGERS = ("ray", "ray.train", "ray.tune", "deepspeed", "DeepSpeed", "datasets", "torch.distributed",
                 "transformers", "filelock", "urllib3")


@contextlib.contextmanager
def sweep_console(log_path: Path, verbosity: int) -> Iterator[tuple[logging.Logger, IO[str]]]:
    """While active: the ``specsweep`` logger writes to the terminal (by ``verbosity``) and to ``log_path``;
    unless ``verbosity`` > 0, stdout, stderr and the noisy libraries' loggers go to ``log_path`` only.
    Yields the logger and the terminal stream (for a progress bar)."""
    terminal = sys.stderr
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", buffering=1) as log_file:
        logger = logging.getLogger("specsweep")
        logger.setLevel(logging.DEBUG)
        logger.propagate = False
        logger.disabled = False  # a library's logging.config.dictConfig may have disabled every existing logger
        console = logging.StreamHandler(terminal)
        console.setLevel(logging.WARNING if verbosity < 0 else logging.INFO)
        to_file = logging.StreamHandler(log_file)
        to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(console)
        logger.addHandler(to_file)
        saved_levels = {name: logging.getLogger(name).level for name in NOISY_LOGGERS}
        try:
            if verbosity > 0:
                yield logger, terminal
                return
            for name in NOISY_LOGGERS:
                logging.getLogger(name).setLevel(logging.WARNING)
            with contextlib.redirect_stdout(log_file), contextlib.redirect_stderr(log_file):
                yield logger, terminal
        finally:
            logger.removeHandler(console)
            logger.removeHandler(to_file)
            for name, level in saved_levels.items():
                logging.getLogger(name).setLevel(level)
