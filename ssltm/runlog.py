"""Where a training run's messages go: the console and, on the first process, ``WORK_DIR/train.log``.

Train speaks through the ``ssltm.train`` logger. While a :class:`RunLog` is active, its records at INFO and
above reach the console (through ``tqdm.write``, so a progress bar stays whole; warnings to stderr) and every
record reaches ``train.log``, each line after its time: records at :data:`FILE_ONLY` (the validation tables,
the end of the run) are for the file alone. The log file opens with the work dir (:meth:`RunLog.open`); the
messages said before that (an earlier run's files moved aside, the resume notes) wait in memory and start it,
and a run that stops before it opens (a bad config, a work dir in use) leaves no log. The other processes of
a distributed run say nothing: the first speaks for all.

TensorBoard (``train.tensorboard``) is optional: :func:`check_tensorboard` says how to install it.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from tqdm import tqdm

from .config import ConfigError

LOGGER = logging.getLogger("ssltm.train")
FILE_ONLY = logging.DEBUG  # records at this level go to train.log, not to the console


class _Console(logging.Handler):
    """Writes each message through ``tqdm.write`` to the ``sys.stdout`` (``sys.stderr`` for warnings) of the
    moment."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr if record.levelno >= logging.WARNING else sys.stdout)
        except Exception:
            self.handleError(record)


class _Waiting(logging.Handler):
    """Keeps the records said before the log file opens."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class RunLog:
    """The handlers of :data:`LOGGER` for one run, attached while the context is active and closed after.

    Args:
        main: this is the first process (it alone prints and writes ``train.log``).
    """

    def __init__(self, main: bool):
        self.main = main
        self.handlers: list[logging.Handler] = []
        self.waiting = _Waiting()

    def __enter__(self) -> RunLog:
        self._saved = LOGGER.level, LOGGER.propagate
        LOGGER.setLevel(FILE_ONLY)
        LOGGER.propagate = False  # the console handler prints it; a root handler would print it again
        if self.main:
            console = _Console(logging.INFO)
            self._add(console)
            self._add(self.waiting)
        else:
            self._add(logging.NullHandler())
        return self

    def _add(self, handler: logging.Handler) -> None:
        LOGGER.addHandler(handler)
        self.handlers.append(handler)

    def open(self, path: Path, append: bool) -> None:
        """Write the messages to ``path`` from now on (after the waiting ones), appending to an existing file
        or replacing it; nothing on the other processes."""
        if not self.main:
            return
        file = logging.FileHandler(path, mode="a" if append else "w", encoding="utf-8")
        file.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        for record in self.waiting.records:
            file.handle(record)
        LOGGER.removeHandler(self.waiting)
        self.handlers.remove(self.waiting)
        self._add(file)

    def __exit__(self, *exc) -> None:
        for handler in self.handlers:
            LOGGER.removeHandler(handler)
            handler.close()
        LOGGER.setLevel(self._saved[0])
        LOGGER.propagate = self._saved[1]


def check_tensorboard() -> None:
    """Raise :class:`ConfigError` naming ``train.tensorboard`` and the install command when
    ``torch.utils.tensorboard`` cannot be imported (the ``tensorboard`` package is missing or too old)."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError as err:
        raise ConfigError(
            f"train.tensorboard needs the tensorboard package ({err}): pip install ssltm[tensorboard]"
        ) from None
