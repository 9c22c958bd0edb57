"""What a user sees while a command runs: one progress bar per stage on a terminal (one line
every few seconds otherwise), the warnings that matter, then the results. Everything else
(INFO logs, Ray's and the workers' output) goes to ``<run_dir>/logs/``; ``-v`` brings it
back to the console.

Known noise of the libraries underneath (Ray's token-auth notice, DeepSpeed's accelerator
guess, Ray Data's progress blocks, transformers' loading bars) is kept off the console and
still written to the log file.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

from tqdm import tqdm

LOG_FILE = "elmm-ray.log"
# Loggers that do not propagate to the root logger (they bring their own handlers).
OWN_HANDLER_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "DeepSpeed")
# Substrings of console lines that say nothing a user can act on.
NOISE = (
    "Token authentication is enabled for this Ray cluster",
    "Setting accelerator to CPU",
    "Progress bars disabled",
    "Progress will be logged because stdout is a non-interactive terminal",
    "A new progress UI is available",
)
# Native (C++) lines written straight to file descriptor 2 that say nothing a user can act
# on: Ray's core worker warns about every actor whose constructor arguments it keeps in the
# object store, which is how Ray Data starts its actor pools.
NATIVE_NOISE = (
    r"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the "
    r"object store",
)
# The filter runs as its own small process, so nothing is lost if this one crashes.
_FILTER_SCRIPT = """
import re, sys
noise = re.compile("|".join(sys.argv[1:]))
out = sys.stdout.buffer
for line in sys.stdin.buffer:
    if not noise.search(line.decode("utf-8", "replace")):
        out.write(line)
        out.flush()
"""
# Seconds between progress lines when the output is not a terminal.
LINE_INTERVAL_S = float(os.environ.get("ELMM_PROGRESS_INTERVAL", "15"))

_state = {"verbose": False, "file_handler": None, "log_file": None}


def verbose() -> bool:
    """Whether the console shows everything (``elmm-ray -v``)."""
    return bool(_state["verbose"])


class _QuietFilter(logging.Filter):
    """Drops known noise from console handlers (the log file keeps it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(n in message for n in NOISE)


class _ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.getMessage()}"


def setup(verbose: bool = False) -> None:
    """Console logging for a command: WARNING and up (INFO with ``verbose``), without the
    known noise, and quiet library progress bars unless ``verbose``."""
    _state["verbose"] = verbose
    logging.getLogger("DeepSpeed").addFilter(_QuietFilter())  # its accelerator guess
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_elmm_console", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler._elmm_console = True  # type: ignore[attr-defined]
    handler.setLevel(logging.INFO if verbose else logging.WARNING)
    if verbose:
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(_ConsoleFormatter())
        handler.addFilter(_QuietFilter())
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    if not verbose:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    quiet_libraries()


def filter_native_stderr() -> None:
    """Route what native code writes to file descriptor 2 through a filter process that
    drops :data:`NATIVE_NOISE` (a whole-process command only: pytest and notebooks keep
    their own stderr). Python's ``sys.stderr`` keeps writing to the terminal directly, so
    the order of Python output is untouched."""
    if _state.get("native_filter"):
        return
    import subprocess

    try:
        sys.stderr.flush()
        original = os.dup(2)
        proc = subprocess.Popen([sys.executable, "-c", _FILTER_SCRIPT, *NATIVE_NOISE],
                                stdin=subprocess.PIPE, stdout=original, close_fds=True)
        os.dup2(proc.stdin.fileno(), 2)
        proc.stdin.close()
        sys.stderr = os.fdopen(os.dup(original), "w", buffering=1, encoding="utf-8",
                               errors="replace")
        os.close(original)
    except OSError:  # no pipes or processes here: keep stderr as it is
        return
    _state["native_filter"] = proc


def quiet_libraries() -> None:
    """Apply the console rules to the loggers that bring their own console handlers (call
    again after importing ray.data or deepspeed, which install theirs on import)."""
    for name in OWN_HANDLER_LOGGERS:
        logger = logging.getLogger(name)
        file_handler = _state["file_handler"]
        if file_handler is not None and file_handler not in logger.handlers \
                and not logger.propagate:
            logger.addHandler(file_handler)
        if verbose():
            continue
        for handler in logger.handlers:
            if handler is file_handler or isinstance(handler, logging.FileHandler):
                continue
            if not any(isinstance(f, _QuietFilter) for f in handler.filters):
                handler.addFilter(_QuietFilter())
            # Ray Data's INFO lines ("Starting execution of Dataset ...") and the like
            if handler.level < logging.WARNING:
                handler.setLevel(logging.WARNING)
    if not verbose() and "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def attach_log_file(run_dir: str | Path) -> Path | None:
    """Send every INFO-and-up record of this process to ``<run_dir>/logs/elmm-ray.log``
    (appended; one file per run directory). Object-store run dirs get no local log."""
    if "://" in str(run_dir):
        return None
    path = Path(run_dir) / "logs" / LOG_FILE
    if _state["log_file"] == path:
        return path
    detach_log_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    _state["file_handler"], _state["log_file"] = handler, path
    quiet_libraries()
    return path


def detach_log_file() -> None:
    handler = _state["file_handler"]
    if handler is None:
        return
    for logger in [logging.getLogger(), *map(logging.getLogger, OWN_HANDLER_LOGGERS)]:
        if handler in logger.handlers:
            logger.removeHandler(handler)
    handler.close()
    _state["file_handler"], _state["log_file"] = None, None


def log_file() -> Path | None:
    """The log file of the current run directory, if one is attached."""
    return _state["log_file"]


def say(stage: str, text: str, *, enabled: bool = True) -> None:
    """One console line about ``stage`` (also written to the log file)."""
    logging.getLogger("elmm_ray.console").info("[%s] %s", stage, text)
    if enabled and not verbose():  # verbose: the INFO record above is already on stderr
        print(f"[{stage}] {text}", flush=True)


class StageProgress:
    """Progress of one stage: a tqdm bar on a terminal, else a line at most every
    ``LINE_INTERVAL_S`` seconds and one at the end. ``update(done=...)`` sets the count,
    ``update(n=...)`` adds to it; keyword ``postfix`` values are shown beside it."""

    def __init__(self, stage: str, total: int | None, unit: str = "it", *,
                 enabled: bool = True, initial: int = 0) -> None:
        self.stage, self.total, self.unit, self.enabled = stage, total, unit, enabled
        self.done, self.postfix = initial, {}
        self.start = time.perf_counter()
        # The first line comes a few seconds in, then one per interval.
        self.last_line = self.start - max(0.0, LINE_INTERVAL_S - 3.0)
        self.tty = enabled and sys.stderr.isatty()
        self.bar = (tqdm(total=total, initial=initial, desc=stage, unit=unit,
                         dynamic_ncols=True, leave=False) if self.tty else None)

    def update(self, done: int | None = None, n: int = 0, **postfix) -> None:
        if not self.enabled:
            return
        before = self.done
        self.done = done if done is not None else self.done + n
        self.postfix.update(postfix)
        if self.bar is not None:
            self.bar.update(self.done - before)
            if postfix:
                self.bar.set_postfix({k: _short(v) for k, v in self.postfix.items()},
                                     refresh=False)
            return
        now = time.perf_counter()
        if now - self.last_line >= LINE_INTERVAL_S and self.done < (self.total or 1 << 62):
            self.last_line = now
            print(f"[{self.stage}] {self._status(now)}", flush=True)

    def _status(self, now: float) -> str:
        elapsed = now - self.start
        text = f"{self.done:,}"
        if self.total:
            text += f"/{self.total:,} {self.unit} ({100 * self.done / self.total:.0f}%)"
            rate = self.done / elapsed if elapsed > 0 else 0
            if 0 < self.done < self.total and rate > 0:
                text += f", ETA {(self.total - self.done) / rate:.0f}s"
        else:
            text += f" {self.unit}"
        extra = "  ".join(f"{k} {_short(v)}" for k, v in self.postfix.items())
        return f"{text}  {extra}".rstrip()

    def close(self, summary: str | None = None) -> None:
        """End the bar; print ``summary`` if given (the stage runner says how a stage
        ended, so a bar normally closes silently)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if summary:
            print(f"[{self.stage}] {summary}", flush=True)


class LoopProgress:
    """The training loop's progress records (``{step, steps, epoch, loss | val_mrr}``) as
    a :class:`StageProgress`, created at the first record (when the step count is known)."""

    def __init__(self, stage: str = "train", *, enabled: bool = True) -> None:
        self.stage, self.enabled = stage, enabled
        self.progress: StageProgress | None = None

    def __call__(self, record: dict) -> None:
        if "event" in record:  # a line of its own (e.g. a resumed run)
            say(self.stage, record["text"], enabled=self.enabled)
            return
        if not self.enabled:
            return
        if self.progress is None:
            self.progress = StageProgress(self.stage, record["steps"], "steps",
                                          initial=record["step"] - 1)
        postfix = {k: record[k] for k in ("epoch", "loss", "val_mrr") if k in record}
        self.progress.update(done=record["step"], **postfix)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
