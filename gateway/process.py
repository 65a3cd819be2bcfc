"""Run ``python -m gateway`` as a child process that never outlives its parent.

Used by ``python -m serving --gateway`` (``make serve``), the integration tests and the
benchmark, so every gateway this project starts is started and stopped the same way.
Only the standard library and :mod:`serving.runtime`: the launcher imports this without
the gateway's packages.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence

from serving.runtime import child_command


def start(
    args: Sequence[str], ready_url: str, timeout: float = 180.0, **popen: object
) -> subprocess.Popen[bytes]:
    """Start ``python -m gateway *args``; return once ``ready_url`` answers 200. It gets
    SIGTERM when this process dies.

    Raises RuntimeError (and leaves nothing running) if it exits or is not ready in time.
    """
    process = subprocess.Popen(  # type: ignore[call-overload]
        child_command([sys.executable, "-m", "gateway", *args]), **popen
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the gateway exited with code {process.returncode} during start-up")
        with (
            contextlib.suppress(OSError, urllib.error.URLError),
            urllib.request.urlopen(ready_url, timeout=2) as response,
        ):
            if response.status == 200:
                return process
        time.sleep(0.3)
    stop(process)
    raise RuntimeError(f"the gateway was not ready at {ready_url} after {timeout:.0f}s")


def stop(process: subprocess.Popen[bytes], drain: float = 35.0) -> None:
    """SIGTERM (the gateway stops accepting and drains its streams), SIGKILL if it overstays."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=drain)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
