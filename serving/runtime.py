"""Locate the ``tritonserver`` bundled in the ``nvidia-pytriton`` wheel and prepare its runtime.

The wheel ships the server binary, its shared libraries, the Python backend and one
``triton_python_backend_stub`` per Python version. The stub that matches this interpreter
must sit beside ``libtriton_python.so`` in the directory given to ``--backend-directory``,
so that directory is assembled in the cache (the installed package is never modified).

The stub ignores ``PYTHONPATH``: it finds its environment through the ``python3`` on
``PATH``. :func:`server_env` therefore puts this interpreter's ``bin/`` first.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serving.assets import cache_dir
from serving.errors import ConfigError

STUB_NAME = "triton_python_backend_stub"


@dataclass(frozen=True)
class TritonInstall:
    """Paths of one tritonserver installation."""

    binary: Path
    libs: Path | None
    backend_dir: Path


def _pytriton_root() -> Path:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or spec.origin is None:
        raise ConfigError(
            "nvidia-pytriton is not installed, so there is no tritonserver binary; "
            "run 'make venv' (or pip install nvidia-pytriton==0.7.0)"
        )
    return Path(spec.origin).parent


def python_version_tag() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def bundled_install(python_tag: str | None = None) -> TritonInstall:
    """The wheel's server with a backend directory built for this interpreter's stub."""
    root = _pytriton_root()
    server_dir = root / "tritonserver"
    binary = server_dir / "bin" / "tritonserver"
    if not binary.is_file():
        raise ConfigError(f"tritonserver binary not found at {binary}; reinstall nvidia-pytriton")
    tag = python_tag or python_version_tag()
    stub = server_dir / "python_backend_stubs" / tag / STUB_NAME
    if not stub.is_file():
        have = sorted(p.name for p in (server_dir / "python_backend_stubs").glob("*"))
        raise ConfigError(
            f"no Python backend stub for Python {tag} in nvidia-pytriton "
            f"(it ships {', '.join(have) or 'none'}); use one of those Python versions"
        )
    libs = root.parent / "nvidia_pytriton.libs"
    return TritonInstall(
        binary=binary,
        libs=libs if libs.is_dir() else None,
        backend_dir=_assemble_backends(server_dir / "backends", stub),
    )


def _assemble_backends(source: Path, stub: Path) -> Path:
    """Copy the wheel's backends plus the matching stub into a cache folder, once."""
    python_src = source / "python"
    parts = [
        python_src / "libtriton_python.so",
        python_src / "triton_python_backend_utils.py",
        stub,
    ]
    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        raise ConfigError(f"nvidia-pytriton install is incomplete, missing: {', '.join(missing)}")
    key = hashlib.sha256(
        "|".join(f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in parts).encode()
    ).hexdigest()[:12]
    target = cache_dir() / "backends" / key
    if (target / "python" / STUB_NAME).is_file():
        return target
    staging = target.with_name(f"{key}.tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(stub, staging / "python" / STUB_NAME)
    try:
        staging.rename(target)
    except OSError:  # a concurrent launcher finished first; its copy is identical
        shutil.rmtree(staging, ignore_errors=True)
    return target


def custom_install(binary: Path) -> TritonInstall:
    """A system tritonserver (for example /opt/tritonserver in the NGC container)."""
    if not binary.is_file():
        raise ConfigError(f"tritonserver binary not found at {binary}")
    backends = binary.parent.parent / "backends"
    if not backends.is_dir():
        raise ConfigError(f"no backends directory beside {binary} (looked in {backends})")
    return TritonInstall(binary=binary, libs=None, backend_dir=backends)


def server_env(install: TritonInstall, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for the server: its libraries, and this interpreter first on PATH."""
    env = dict(os.environ if base is None else base)
    lib_paths = [str(install.libs)] if install.libs else []
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir:
        lib_paths.append(libdir)
    if env.get("LD_LIBRARY_PATH"):
        lib_paths.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(lib_paths)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")])
    # Each stub is its own process on shared cores; libraries must not each grab every core.
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    return env


_CHILD = Path(__file__).with_name("child.py")


def child_command(
    command: Sequence[str],
    death_signal: int | None = signal.SIGTERM,
    cpus: Iterable[int] = (),
) -> list[str]:
    """``command`` run through :mod:`serving.child`, which gives it ``death_signal`` when
    this process dies (SIGKILL included) and pins it to ``cpus``, then execs it (same pid).

    Start every child this way, never with a ``preexec_fn``: that forks, and a fork can
    crash the child before ``exec`` in a process holding a gRPC client (see
    :mod:`serving.child`). The death signal follows the thread that starts the child, so
    it is only asked for from the main thread: a server started from a worker thread (a
    benchmark's thread pool) would otherwise die when that thread ends.
    """
    wrapper = [sys.executable, "-I", "-S", str(_CHILD)]
    if death_signal is not None and threading.current_thread() is threading.main_thread():
        wrapper += ["--death-signal", str(int(death_signal)), "--parent", str(os.getpid())]
    pinned = sorted(set(cpus))
    if pinned:
        wrapper += ["--cpus", ",".join(map(str, pinned))]
    return [*wrapper, "--", *command]


def process_group(pgid: int = 0) -> dict[str, Any]:
    """``subprocess.Popen`` keywords that start the child in process group ``pgid`` (0: a
    new group it leads). Python 3.11+ does that without a ``preexec_fn``; on 3.10 it
    still takes one, with the fork hazard :func:`child_command` explains."""
    if sys.version_info >= (3, 11):
        return {"process_group": pgid}
    return {"preexec_fn": functools.partial(os.setpgid, 0, pgid)}  # pragma: no cover


def start_group_reaper(pgid: int) -> subprocess.Popen[bytes] | None:
    """Start :mod:`serving.reaper` in process group ``pgid``: it SIGKILLs the group when
    this process dies. None when called off the main thread, where a parent-death signal
    would follow the calling thread instead of the process (see :func:`child_command`).
    The reaper arms that signal itself, once its handler is in place."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return subprocess.Popen(
        [sys.executable, "-m", "serving.reaper", str(pgid), str(os.getpid())],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        **process_group(pgid),
    )


def run_foreground(
    body: Callable[[], int],
    cleanup: Callable[[], None],
    errors: tuple[type[BaseException], ...],
) -> int:
    """Run a foreground command's ``body`` the way every CLI here stops.

    SIGTERM (docker stop, Kubernetes) acts like Ctrl-C, also during start-up: exit code 0.
    One of ``errors`` prints one ``error:`` line and exits 1. ``cleanup`` always runs, and a
    second Ctrl-C does not interrupt it.
    """
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return body()
    except errors as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    except KeyboardInterrupt:
        sys.stdout.write("stopping ...\n")
        sys.stdout.flush()
        return 0
    finally:
        with contextlib.suppress(KeyboardInterrupt):
            cleanup()


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt
