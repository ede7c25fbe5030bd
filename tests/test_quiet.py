"""gemma_edge.quiet: the libraries' chatter is kept aside unless --verbose, errors never are.

Each case runs in a child process: the capture moves file descriptor 2, which pytest's
own capture also uses.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# a command body: native-style writes to fd 2, library logging and warnings, the project's
# logging, a progress bar, and an optional failure
SCRIPT = textwrap.dedent("""
    import logging, os, sys, warnings
    from gemma_edge.quiet import library_output

    verbose, mode = sys.argv[1] == "1", sys.argv[2]
    with library_output(verbose) as captured:
        os.write(2, b"INFO: [environment.cc:36] native chatter\\n")
        logging.getLogger("sentence_transformers").info("library info")
        logging.getLogger("jax._src.xla_bridge").warning("library warning")
        logging.getLogger("torchao").error("library error")
        warnings.warn("library future warning", FutureWarning)
        logging.getLogger("gemma_edge.device").info("project info")
        from tqdm import tqdm
        for _ in tqdm(range(3), desc="our progress"):
            pass
        print("the result")
        if mode == "native-error":
            os.write(2, b"E0000 00:00:1.0 1 kernel.cc:9] native failure\\n")
        if mode == "user-error":
            os.write(2, b"E0000 00:00:1.0 1 kernel.cc:9] native failure\\n")
            from gemma_edge.errors import InputError
            try:
                raise InputError("a clear message")
            except InputError as exc:  # as gemma_edge.cli.main handles it
                captured.replay_errors()
                print(f"error: {exc}", file=sys.stderr)
        if mode == "raise":
            raise RuntimeError("the command failed")
    print("fd2 restored", file=sys.stderr)
    sys.exit(2 if mode == "user-error" else 0)
""")


def _run(verbose: bool, mode: str = "ok") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", SCRIPT, "1" if verbose else "0", mode],
                          capture_output=True, text=True, env=env, timeout=120)


def test_chatter_is_hidden_and_ours_shows() -> None:
    done = _run(verbose=False)
    assert done.returncode == 0, done.stderr
    for hidden in ("native chatter", "library info", "library warning", "library future"):
        assert hidden not in done.stderr
    for shown in ("library error", "project info", "our progress", "fd2 restored"):
        assert shown in done.stderr
    assert done.stdout == "the result\n"


def test_verbose_shows_everything() -> None:
    done = _run(verbose=True)
    assert done.returncode == 0, done.stderr
    for shown in ("native chatter", "library info", "library warning", "library future",
                  "library error", "project info", "our progress"):
        assert shown in done.stderr


def test_failure_replays_the_capture_before_the_traceback() -> None:
    done = _run(verbose=False, mode="raise")
    assert done.returncode == 1
    err = done.stderr
    assert "native chatter" in err and "library warning" in err
    assert err.index("native chatter") < err.index("Traceback") < err.index("the command failed")


def test_a_native_error_line_shows_although_the_command_succeeded() -> None:
    done = _run(verbose=False, mode="native-error")
    assert done.returncode == 0
    assert "libraries reported errors" in done.stderr and "native failure" in done.stderr
    assert "native chatter" not in done.stderr


def test_capture_file_is_removed_and_env_restored(tmp_path: Path) -> None:
    code = textwrap.dedent("""
        import glob, os, tempfile
        from gemma_edge.quiet import LIBRARY_ENV, library_output
        os.environ["TORCH_LOGS"] = "+dynamo"  # the user's choice wins
        with library_output(False) as captured:
            path = captured.path
            seen = {k: os.environ.get(k) for k in LIBRARY_ENV}
        print(os.path.exists(path), seen["TORCH_LOGS"], seen["TRANSFORMERS_VERBOSITY"],
              os.environ.get("TRANSFORMERS_VERBOSITY"))
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path)}
    env.pop("TRANSFORMERS_VERBOSITY", None)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.stdout.split() == ["False", "+dynamo", "error", "None"], done.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_cli_embed_prints_no_library_lines_without_verbose(tiny_artifacts: Path,
                                                           tmp_path: Path) -> None:
    """A real command: LiteRT's C++ log lines (INFO: [...cc:N]) appear only with --verbose."""
    texts = tmp_path / "texts.txt"
    texts.write_text("how do I reset my router\n", encoding="utf-8")
    exe = Path(sys.executable).with_name("gemma-edge")
    def embed(*extra: str) -> subprocess.CompletedProcess:
        # a fresh weight cache per run: both runs pack it, so both print the same native lines
        env = {**os.environ, "GEMMA_EDGE_CACHE_DIR": str(tmp_path / f"cache{len(extra)}")}
        return subprocess.run([str(exe), *extra, "embed", "--artifacts", str(tiny_artifacts),
                               "--input", str(texts), "--output", str(tmp_path / "v.npy"),
                               "--backend", "cpu", "--precision", "int8"],
                              capture_output=True, text=True, env=env, timeout=600)

    quiet, loud = embed(), embed("--verbose")
    assert quiet.returncode == 0 and loud.returncode == 0, quiet.stderr + loud.stderr
    native = "INFO: ["  # LiteRT's C++ logging prefix
    assert native in loud.stderr
    assert native not in quiet.stderr, quiet.stderr
    assert "wrote" in quiet.stdout and "embedding" in quiet.stderr  # result and progress bar


def test_a_user_error_shows_its_message_and_library_errors_not_the_chatter() -> None:
    done = _run(verbose=False, mode="user-error")
    assert done.returncode == 2
    assert "error: a clear message" in done.stderr and "native failure" in done.stderr
    assert "native chatter" not in done.stderr and "library warning" not in done.stderr
