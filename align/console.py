"""The terminal during a run: align's own lines and one progress bar, and nothing else.

What libraries print while a stage works (their progress bars, warnings, vLLM's INFO lines, a worker
process's output) tells someone watching a run nothing, and someone debugging one a lot. :func:`capture`
sends it to the run's log instead, at the level of file descriptors 1 and 2, so that C extensions and
the processes a stage starts are caught too; ``verbose`` shows it on the terminal as well.

align itself talks to the user through the ``align`` logger, whose records :func:`capture` writes to the
terminal, and through :class:`align.progress.Progress`, which draws on the :func:`active` console.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

__all__ = ["Console", "active", "capture"]


class Console:
    """The user's terminal while output is captured: lines, and at most one live line (a progress bar).

    On a terminal the live line is redrawn in place; elsewhere (a CI log, a file, a notebook) nothing is
    redrawn and no control characters are written: :class:`~align.progress.Progress` prints plain lines.
    """

    def __init__(self, stream: IO[str], verbose: bool = False) -> None:
        self.stream, self.verbose = stream, verbose
        self.is_terminal = _isatty(stream)
        self._live = ""  # the live line on screen, to redraw after a line is printed above it
        self._lock = threading.RLock()  # the capture thread writes here too, with -v

    @property
    def width(self) -> int:
        # The terminal's own width: descriptor 1, which shutil would ask, is the capture's pipe by now.
        try:
            return os.get_terminal_size(self.stream.fileno()).columns
        except (OSError, ValueError, AttributeError):
            return 100

    def line(self, text: str) -> None:
        """Print ``text`` (one or more lines) above the live line."""
        with self._lock:
            self._clear()
            self._write(text + "\n")
            self._draw()

    def live(self, text: str) -> None:
        """Show ``text`` as the live line, replacing the one before (on a terminal only)."""
        if not self.is_terminal:
            return
        with self._lock:
            self._live = text[: self.width - 1]
            self._write("\r" + self._live + "\x1b[K")

    def end_live(self) -> None:
        """Remove the live line."""
        with self._lock:
            self._clear()
            self._live = ""

    def passthrough(self, data: bytes) -> None:
        """Show captured output as it came (``verbose``)."""
        with self._lock:
            self._clear()
            self._write(data.decode("utf-8", errors="replace"))
            self._draw()

    def _clear(self) -> None:
        if self.is_terminal and self._live:
            self._write("\r\x1b[K")

    def _draw(self) -> None:
        if self.is_terminal and self._live:
            self._write(self._live)

    def _write(self, text: str) -> None:
        with contextlib.suppress(OSError, ValueError):  # a closed terminal must not fail the run
            self.stream.write(text)
            self.stream.flush()


_active: Console | None = None


def active() -> Console | None:
    """The console of the run in progress in this process, or None (nothing captured; another rank)."""
    return _active


class _LogFileHandler(logging.FileHandler):
    def handleError(self, record: logging.LogRecord) -> None:
        # On a full disk the log cannot be written either; the terminal still shows the message, which
        # logging's own traceback for each line it could not write would only bury.
        if not isinstance(sys.exc_info()[1], OSError):
            super().handleError(record)


class _ConsoleHandler(logging.Handler):
    def __init__(self, console: Console) -> None:
        super().__init__(logging.DEBUG if console.verbose else logging.INFO)
        self.console = console
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.console.line(self.format(record))
        except Exception:  # noqa: BLE001 - logging's own contract: never raise from a handler
            self.handleError(record)


@contextlib.contextmanager
def capture(log: Path, show: bool, verbose: bool = False, label: str = "") -> Iterator[Console | None]:
    """Send everything written to file descriptors 1 and 2 to ``log`` until the block ends.

    :param show: whether this process speaks to the user (the main process): the ``align`` logger's
        records go to ``log`` (all of them, tracebacks of failures included) and to the terminal (from
        INFO), and it gets the :func:`active` console that progress bars draw on.
    :param verbose: also show the captured output on the terminal, and align's debug records.
    :param label: put before each captured line in ``log`` (another process's rank).

    Yields the console, or None when ``show`` is false.
    """
    global _active
    align_logger = logging.getLogger("align")
    if show:
        records = _LogFileHandler(log, encoding="utf-8")
        records.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        align_logger.addHandler(records)
        align_logger.setLevel(logging.DEBUG)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    terminal = _terminal_stream() if show else None
    console = Console(terminal, verbose) if terminal is not None else None
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    reader, writer = os.pipe()
    os.dup2(writer, 1)
    os.dup2(writer, 2)
    os.close(writer)
    # A notebook's sys.stdout and sys.stderr are not file descriptors 1 and 2: point them there too.
    replaced = {name: getattr(sys, name) for name in ("stdout", "stderr") if not _on_fd(getattr(sys, name))}
    for name in replaced:
        setattr(sys, name, open(1 if name == "stdout" else 2, "w", closefd=False, buffering=1))  # noqa: SIM115
    copier = threading.Thread(
        target=_copy, args=(reader, log, label, console if verbose else None), name="align-capture", daemon=True
    )
    copier.start()
    handler = _ConsoleHandler(console) if console is not None else None
    if handler is not None:
        align_logger.addHandler(handler)
        _active = console
    try:
        yield console
    finally:
        if handler is not None:
            align_logger.removeHandler(handler)
            _active = None
            console.end_live()  # type: ignore[union-attr]
        if show:
            align_logger.removeHandler(records)
            records.close()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        for name, original in replaced.items():
            getattr(sys, name).close()
            setattr(sys, name, original)
        for fd, copy in saved.items():
            os.dup2(copy, fd)  # closes the pipe's last write ends this process holds: the copier sees the end
            os.close(copy)
        # A process the stage started may still hold the pipe open; the copier is a daemon thread.
        copier.join(timeout=5)
        if terminal is not None and terminal is not sys.stderr:
            with contextlib.suppress(OSError):
                terminal.close()


def _terminal_stream() -> IO[str]:
    """Where the user's terminal is, before descriptor 2 is taken over: a copy of descriptor 2, or (in a
    notebook, whose sys.stderr is no descriptor) sys.stderr itself."""
    if _on_fd(sys.stderr):
        return open(os.dup(2), "w", encoding="utf-8", errors="replace", buffering=1)  # noqa: SIM115
    return sys.stderr


def _on_fd(stream: object) -> bool:
    if not isinstance(stream, io.TextIOWrapper):
        return False
    try:
        return stream.fileno() in (1, 2)
    except (OSError, ValueError):
        return False


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty() and os.environ.get("TERM") != "dumb"
    except (OSError, ValueError):
        return False


#: Terminal control sequences (cursor moves, colours) that a captured progress bar or log line carries.
_CONTROL = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")


def _copy(reader: int, log: Path, label: str, console: Console | None) -> None:
    """Copy the pipe into the log a line at a time, with the time and ``label`` in front. Of a line redrawn
    with carriage returns (a progress bar) only its last state is kept, without control sequences."""
    prefix = f" {label}".encode() if label else b""
    try:
        out: IO[bytes] | None = open(log, "ab")  # noqa: SIM115
    except OSError:
        out = None  # the run reports its log's problem itself; keep draining, so that writers never block
    buffer = b""
    while True:
        try:
            data = os.read(reader, 65536)
        except OSError:
            data = b""
        if console is not None and data:
            console.passthrough(data)
        buffer += data
        if data:
            *lines, buffer = buffer.split(b"\n")
        else:
            lines, buffer = buffer.split(b"\n"), b""
        now = time.time()
        stamp = (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)) + f",{int(now % 1 * 1000):03d}").encode()
        kept = (_CONTROL.sub(b"", line.rstrip(b"\r").rsplit(b"\r", 1)[-1]) for line in lines)
        text = b"".join(b"%s OUTPUT%s: %s\n" % (stamp, prefix, line) for line in kept if line.strip())
        if out is not None and text:
            with contextlib.suppress(OSError):
                out.write(text)
                out.flush()
        if not data:
            break
    if out is not None:
        out.close()
    os.close(reader)
