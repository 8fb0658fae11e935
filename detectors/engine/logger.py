"""Text log and JSON-lines metrics in the output folder, written by the main process only."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .checkpoint import write_atomically

__all__ = ["setup_logging", "MetricsWriter"]


class _TqdmHandler(logging.Handler):
    """Writes records above any active progress bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stderr)


def setup_logging(output_dir: Path | None, main_process: bool) -> logging.Logger:
    """Configures the ``detectors`` logger: console on the main process (warnings only on the others)
    and, on the main process, ``output_dir/log.txt``.

    Returns:
        The ``detectors`` logger.
    """
    logger = logging.getLogger("detectors")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    fmt = logging.Formatter("[%(asctime)s %(name)s] %(message)s", datefmt="%m/%d %H:%M:%S")
    console = _TqdmHandler()
    console.setFormatter(fmt)
    console.setLevel(logging.INFO if main_process else logging.WARNING)
    logger.addHandler(console)
    if main_process and output_dir is not None:
        output_dir.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(output_dir / "log.txt")
        file_handler.setFormatter(fmt)
        logger.addHandler(file_handler)
    return logger


class MetricsWriter:
    """Appends one JSON object per line to ``metrics.jsonl``.

    Args:
        path: the file.
        resume_from: when resuming at this iteration, records of later iterations (written by the
            interrupted run after its last checkpoint) are removed first, so the file reads as one run; so are
            lines that are not JSON records (a write cut short by a full disk or a kill), with a warning.
        redo_evaluation: the run evaluates again at ``resume_from`` (it resumes a finished run): that
            iteration's evaluation records are removed too.
    """

    def __init__(self, path: Path, resume_from: int | None = None, redo_evaluation: bool = False):
        self.path = path
        self.evaluated: set[int] = set()  # the iterations of the evaluation records kept
        if resume_from is not None and path.is_file():
            kept, broken = [], 0
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    record = None
                if not isinstance(record, dict):
                    broken += 1
                    continue
                at = record.get("iter", 0)
                if at < resume_from or (at == resume_from and not (redo_evaluation and "bbox" in record)):
                    kept.append(line)
                    if "bbox" in record:
                        self.evaluated.add(at)
            if broken:
                logging.getLogger("detectors.train").warning(
                    "%s: dropped %d line(s) that are not JSON records (a write cut short)", path, broken)
            # a kill while rewriting must not lose the earlier lines
            write_atomically(path, lambda tmp: tmp.write_text("".join(line + "\n" for line in kept)))
        elif resume_from is None:
            path.write_text("")

    def write(self, record: dict[str, Any]) -> None:
        """Appends ``record`` (JSON-serialisable) as one line."""
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
