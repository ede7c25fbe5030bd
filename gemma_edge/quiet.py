"""Keep the libraries' log chatter out of a command's output unless ``--verbose``.

An export or the demo used to print hundreds of lines that are not the user's business:
LiteRT's and TensorFlow's C++ logs (accelerator registration, oneDNN, flatbuffer op
counts), absl's pre-init warning, torch/torchao/JAX warnings, sentence-transformers'
INFO logging, transformers' and litert-torch's own progress output. They come by three
routes, and each is handled where it can be:

- Native code writes straight to file descriptor 2, below Python. While a command runs,
  fd 2 points at a temp file (worker processes inherit it), and ``sys.stderr`` at a copy
  of the real terminal, so the progress bars, the project's messages and its errors still
  show. On an exception the whole temp file is printed before the error; on success the
  lines in it that look like errors are printed; so no error message is swallowed.
- Python logging: the project's loggers (``gemma_edge.*``) print as before; other loggers'
  records below ERROR go to the same temp file (shown with it on failure), ERROR and
  above print. ``warnings`` are routed through logging the same way.
- Libraries that install their own handler or printer read an environment variable when
  first imported (set only when the user has not set it): transformers' verbosity,
  Hugging Face's progress bars, torch's log level, litert-torch's progress printer.

With ``verbose`` none of this happens: every library prints as it likes and the
project logs at DEBUG. The module imports only the standard library (it runs on boards).
"""

from __future__ import annotations

import contextlib
import faulthandler
import io
import logging
import os
import re
import sys
import tempfile
from typing import Iterator, List, Optional

PROJECT_LOGGER = "gemma_edge"
# read by the libraries at import; values that drop their INFO/WARNING output
LIBRARY_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",       # transformers' own stderr handler
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",     # "Loading weights", "Writing model shards" bars
    "TORCH_LOGS": "-all",                    # torch's own handler (the _pytree W lines)
    "LITERT_TORCH_SHOW_PROGRESS": "n",       # litert-torch's [START]/[ DONE] lines on stdout
}
# native and Python lines that report a failure, shown even when the command succeeds
ERROR_LINE = re.compile(
    r"^(?:[EF]\d{4} \d|(?:ERROR|FATAL|Fatal|Error)\b|\w+(?:Error|Exception)\b: |"
    r"Traceback \(most recent call last\)|terminate called|Segmentation fault)|Check failed")


class _Terminal(io.TextIOBase):
    """``sys.stderr`` while fd 2 is captured: writes go to ``fd`` (a duplicate of the real
    fd 2). After the capture ends, to whatever ``sys.stderr`` is then, since handlers
    created meanwhile (torch's, transformers') keep a reference to this object."""

    def __init__(self, fd: int, encoding: str) -> None:
        super().__init__()
        self._fd: Optional[int] = fd
        self._encoding = encoding

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self._encoding

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if self._fd is None:
            return sys.stderr.write(text) if sys.stderr is not self else len(text)
        data = text.encode(self._encoding, "backslashreplace")
        while data:
            data = data[os.write(self._fd, data):]
        return len(text)

    def isatty(self) -> bool:
        return os.isatty(self._fd) if self._fd is not None else sys.stderr.isatty()

    def fileno(self) -> int:
        if self._fd is None:
            return sys.stderr.fileno()
        return self._fd

    def release(self) -> None:
        """Close the duplicate; later writes follow ``sys.stderr``."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


class Capture:
    """What the libraries wrote during one command; see :func:`library_output`."""

    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose
        self.path: Optional[str] = None  # the temp file fd 2 points at, None when not captured
        self._replayed = False

    def text(self) -> str:
        """Everything captured so far ('' when nothing is captured)."""
        if self.path is None:
            return ""
        sys.stderr.flush()
        with open(self.path, encoding="utf-8", errors="replace") as handle:
            return handle.read()

    def replay(self) -> None:
        """Print everything captured, once: called when the command fails."""
        text = self.text()
        if self._replayed or not text.strip():
            return
        self._replayed = True
        sys.stderr.write("---- output of the libraries during this command ----\n")
        sys.stderr.write(text if text.endswith("\n") else text + "\n")
        sys.stderr.write("---- end of the libraries' output ----\n")

    def replay_errors(self) -> None:
        """Print only the captured error lines, once: for a gemma-edge error, whose own
        message says what is wrong; the libraries' routine chatter would bury it."""
        lines = [] if self._replayed else self.error_lines()
        self._replayed = True
        if lines:
            sys.stderr.write("gemma-edge: the libraries reported (--verbose shows all their output):\n")
            sys.stderr.write("".join(f"  {line}\n" for line in lines))

    def error_lines(self) -> List[str]:
        """The captured lines that report an error (native logs, tracebacks)."""
        return [line for line in self.text().splitlines() if ERROR_LINE.search(line)]


_active: Optional[Capture] = None


class _Route(logging.Filter):
    """Which records a handler takes: the project's and ERROR+ (terminal), or the rest."""

    def __init__(self, to_terminal: bool) -> None:
        super().__init__()
        self.to_terminal = to_terminal

    def filter(self, record: logging.LogRecord) -> bool:
        shown = record.levelno >= logging.ERROR or _is_project(record)
        return shown == self.to_terminal


def _is_project(record: logging.LogRecord) -> bool:
    if record.name == PROJECT_LOGGER or record.name.startswith(PROJECT_LOGGER + "."):
        return True
    if record.name == "py.warnings":  # a warning raised in the project's own files
        text = str(record.args[0]) if record.args else record.getMessage()
        return any(text.startswith(d) for d in _project_dirs())
    return False


def _project_dirs() -> List[str]:
    import importlib.util

    dirs = []
    for name in ("gemma_edge", "gemma_edge.export", "gemma_edge.compile", "gemma_edge.device"):
        spec = importlib.util.find_spec(name)
        for location in (spec.submodule_search_locations or []) if spec else []:
            dirs.append(os.path.join(os.path.abspath(location), ""))
    return dirs


class _CurrentStderr(logging.StreamHandler):
    """A handler that writes to ``sys.stderr`` as it is at each record (pytest's capsys,
    the terminal copy during a capture), not as it was when the handler was made."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # the base class assigns it; it is always sys.stderr
        pass


class _Fd2(logging.StreamHandler):
    """A handler that writes to file descriptor 2 itself (the capture file)."""

    def __init__(self) -> None:
        super().__init__()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = (self.format(record) + "\n").encode("utf-8", "backslashreplace")
            while data:
                data = data[os.write(2, data):]
        except OSError:  # fd 2 closed: nowhere to put a hidden record
            pass


@contextlib.contextmanager
def library_output(verbose: bool, until_exit: bool = False) -> Iterator[Capture]:
    """Run a command with the libraries' chatter captured (see the module docstring).

    Nested calls (the demo runs the CLI for each step) share the outer capture; a
    nested ``verbose`` has no effect once the outer one decided. An exception leaving
    the block replays the capture before it propagates. ``until_exit`` (the console
    script) leaves fd 2 on the (deleted) capture file after the block, for the lines
    LiteRT prints as the interpreter shuts down; ``sys.stderr`` still reaches the
    terminal, so a traceback or a Python warning at exit still shows.
    """
    global _active
    if _active is not None:
        yield _active
        return
    capture = _active = Capture(verbose)
    try:
        with _logging(verbose), _environment(verbose), \
                _native_stderr(capture, verbose, until_exit):
            try:
                yield capture
            except (KeyboardInterrupt, GeneratorExit):
                raise
            except BaseException:
                capture.replay()
                raise
            import gc

            gc.collect()  # LiteRT prints as its objects are freed: free them inside the capture
            errors = [] if capture._replayed else capture.error_lines()
            if errors:
                sys.stderr.write("gemma-edge: the libraries reported errors although the command "
                                 "succeeded (--verbose shows all their output):\n")
                sys.stderr.write("".join(f"  {line}\n" for line in errors))
    finally:
        _active = None


@contextlib.contextmanager
def _logging(verbose: bool) -> Iterator[None]:
    """Root handlers for this command, removed afterwards (replaces logging.basicConfig)."""
    root, project = logging.getLogger(), logging.getLogger(PROJECT_LOGGER)
    saved = (root.level, project.level, list(root.handlers))
    formatter = logging.Formatter("%(message)s")
    if verbose:
        handlers: List[logging.Handler] = [_CurrentStderr()]
        root.setLevel(logging.INFO)
        project.setLevel(logging.DEBUG)
    else:
        terminal, hidden = _CurrentStderr(), _Fd2()
        terminal.addFilter(_Route(to_terminal=True))
        hidden.addFilter(_Route(to_terminal=False))
        handlers = [terminal, hidden]
        root.setLevel(logging.WARNING)  # libraries' INFO records are not even made
        project.setLevel(logging.INFO)
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)
    logging.captureWarnings(not verbose)
    try:
        yield
    finally:
        logging.captureWarnings(False)
        for handler in handlers:
            root.removeHandler(handler)
        root.setLevel(saved[0])
        project.setLevel(saved[1])


@contextlib.contextmanager
def _environment(verbose: bool) -> Iterator[None]:
    """LIBRARY_ENV for the libraries imported (and the processes started) meanwhile; a
    value the user set is kept."""
    added = [] if verbose else [k for k in LIBRARY_ENV if k not in os.environ]
    for key in added:
        os.environ[key] = LIBRARY_ENV[key]
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


@contextlib.contextmanager
def _native_stderr(capture: Capture, verbose: bool, until_exit: bool) -> Iterator[None]:
    """Point fd 2 at a temp file and ``sys.stderr`` at a copy of the real fd 2.

    The file is named (gemma-edge-PID-*.stderr.log in the temp folder) and removed at the
    end: if a native library kills the process, it stays for the crash's message, and
    faulthandler prints the Python stack to the terminal.
    """
    if verbose:
        yield
        return
    try:
        sys.stderr.flush()
        real = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no usable fd 2 (closed, embedded)
        yield
        return
    fd, path = tempfile.mkstemp(prefix=f"gemma-edge-{os.getpid()}-", suffix=".stderr.log")
    old_stderr = sys.stderr
    terminal = _Terminal(real, getattr(old_stderr, "encoding", None) or "utf-8")
    try:
        replaces = old_stderr.fileno() == 2
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        replaces = False  # pytest's capsys and the like: leave it, it is not fd 2
    fault = not faulthandler.is_enabled()
    os.dup2(fd, 2)
    os.close(fd)
    capture.path = path
    if replaces:
        sys.stderr = terminal
    if fault:
        faulthandler.enable(file=terminal.fileno())
    try:
        yield
    finally:
        capture.path = None
        with contextlib.suppress(OSError):
            os.unlink(path)
        if not (until_exit and replaces):  # else fd 2 stays on the deleted file until exit
            if fault:
                faulthandler.disable()
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os.dup2(real, 2)
            if replaces and sys.stderr is terminal:
                sys.stderr = old_stderr
            terminal.release()
