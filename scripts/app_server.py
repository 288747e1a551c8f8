"""`python app.py`, started once per process on a free port of 127.0.0.1.

The API and browser tests (and `scripts.bench_app`) share the one server per set of options
(starting it costs seconds); it is stopped when the process exits. The app runs as a user
runs it: its own process, offline, the default preset unless the options say otherwise.
"""

import atexit
import functools
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from core.files import REPO_ROOT

STARTUP_TIMEOUT = 180
LOGS: dict[str, Path] = {}
"""URL of each app started -> the file its output (stdout and stderr) goes to."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@functools.cache
def app_url(*options: str) -> str:
    """Start the app (once per set of command-line options) and return its URL when the
    page answers; it is stopped when this process exits."""
    url, process = start_app(*options)
    atexit.register(stop, process)
    return url


def start_app(*options: str) -> tuple[str, subprocess.Popen]:
    """Start `python app.py` with `options`; (its URL, its process) once the page answers."""
    port = free_port()
    log = Path(tempfile.mkdtemp(prefix="app-")) / "app.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    command = [sys.executable, "app.py", "--host", "127.0.0.1", "--port", str(port), *options]
    with open(log, "w") as out:  # the child keeps its own copy of the file descriptor
        process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the app exited with code {process.returncode}:\n{_tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    LOGS[url] = log
                    return url, process
        except OSError:
            time.sleep(0.1)
    stop(process)
    raise RuntimeError(f"the app did not answer within {STARTUP_TIMEOUT} s:\n{_tail(log)}")


def _tail(log: Path) -> str:
    return log.read_text()[-3000:]


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
