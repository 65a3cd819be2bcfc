"""The one process in tritonserver's process group that watches the launcher.

``python -m serving.reaper <pgid> <launcher pid>``. The launcher starts it inside the
server's process group. It asks for a parent-death signal (SIGUSR1) once its handler is
in place, so a launcher that dies early cannot kill it unhandled. When the launcher dies,
however it dies (SIGKILL from ``timeout``, a test harness or the OOM killer included),
the kernel signals this process, which SIGKILLs the whole group: tritonserver *and* its
Python stubs. The stubs cannot be given a parent-death signal of their own (Triton forks them
from loader threads, and that signal follows the forking thread), and Triton's own
graceful exit waits for model loads in progress, so killing the group is what makes
"nothing outlives the launcher" hold at any moment, mid-load included.

Standard library (and :mod:`serving.child`) only, and nothing else to do: it sleeps in
``signal.pause``. A normal stop kills it with the rest of the group.
"""

from __future__ import annotations

import os
import signal
import sys

from serving.child import set_death_signal


def main(argv: list[str]) -> int:
    pgid, launcher = int(argv[0]), int(argv[1])

    def reap(*_: object) -> None:
        os.killpg(pgid, signal.SIGKILL)  # this process is in the group: it ends here too

    signal.signal(signal.SIGUSR1, reap)
    # Only the launcher's death ends the group; a stray SIGTERM/SIGINT to the group must
    # not turn a graceful stop into a kill.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    set_death_signal(signal.SIGUSR1)
    if os.getppid() != launcher:  # the launcher died before the death signal was armed
        reap()
    while True:
        signal.pause()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
