"""Exec a command so that it dies with the process that started it.

``python -I -S serving/child.py [--death-signal N --parent PID] [--cpus 0,1] -- command...``

Every long-lived process this project starts (tritonserver, the gateway, nginx, Envoy, a
benchmark's servers) must end when its starter ends, even a starter killed with SIGKILL.
The kernel does that with a parent-death signal (``prctl(PR_SET_PDEATHSIG)``): it is set
in the child and kept across ``exec``.

It used to be set from a ``preexec_fn``, and that crashed about one child in 60.
A ``preexec_fn`` makes CPython ``fork()`` where it would otherwise ``vfork()``. The fork
runs gRPC's fork handlers whenever the starter holds a gRPC event engine (the integration
tests, anything with a ``tritonclient.grpc`` client). They restart gRPC's poller thread
in the child, ``close_fds`` then closes that thread's epoll descriptor, and the thread
aborts the child before ``exec``: "Epoll1Poller ... encountered epoll_wait error: Bad
file descriptor" (grpc/grpc#43055). Measured on this project's stack (grpcio 1.85), 22
of 1,250 children died that way with a ``preexec_fn``, and 0 of 500 without.

So the starter runs this script instead, with no ``preexec_fn``. The script sets the signal
and the CPU affinity, checks that its parent is still the process that started it (else
that parent died before the signal was armed), and execs the command in its own place, so
the command keeps the pid the starter was given. Standard library only, and run with
``-I -S``, so nothing on the path or in the environment changes what runs here; the
command itself gets the environment unchanged.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import sys

_PR_SET_PDEATHSIG = 1


def set_death_signal(sig: int) -> None:
    """Ask the kernel for ``sig`` when this process's parent (the thread that forked it)
    dies. Linux only; elsewhere nothing happens."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, sig)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="serving/child.py")
    parser.add_argument("--death-signal", type=int)
    parser.add_argument("--parent", type=int, help="the starter's pid")
    parser.add_argument("--cpus", help="comma-separated CPU numbers to pin to")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command to run")
    if args.cpus:
        os.sched_setaffinity(0, {int(cpu) for cpu in args.cpus.split(",")})
    if args.death_signal is not None:
        set_death_signal(args.death_signal)
        if args.parent is not None and os.getppid() != args.parent:
            os.kill(os.getpid(), args.death_signal)  # the starter is already gone
            return 1  # the signal was caught or ignored: still do not run the command
    sys.stdout.flush()
    try:
        os.execvp(command[0], command)
    except OSError as exc:
        sys.stderr.write(f"serving/child.py: cannot run {command[0]}: {exc}\n")
        return 127
    return 0  # not reached: exec replaced this process


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
