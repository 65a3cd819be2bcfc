"""Find the Python-backend stub processes of a running tritonserver through /proc.

Triton 2.51 does not restart a stub that died: its model keeps answering "Stub process
... is not healthy" while every ready endpoint says 200. Watching the stub processes
themselves is the cheapest reliable signal, and their command line names both the model
instance and the shared-memory region a dead stub leaves behind in /dev/shm.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from serving.runtime import STUB_NAME

SHM_DIR = Path("/dev/shm")


@dataclass(frozen=True)
class Stub:
    pid: int
    model: str
    instance: str
    shm_region: str


def _children(ppid: int, proc: Path) -> list[int]:
    pids = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # After the parenthesised command (which may hold spaces) come the state and the
        # parent pid. A killed stub stays a zombie until Triton reaps it: it is dead.
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 1 and fields[1] == str(ppid) and fields[0] not in ("Z", "X"):
            pids.append(int(entry.name))
    return pids


def parse_cmdline(argv: list[str]) -> tuple[str, str, str] | None:
    """(model, instance, shm region) from a stub's argv, or None if it is not a stub.

    The stub is started as ``stub <model_path> <shm_region> <shm_size> <shm_growth>
    <parent_pid> <python_lib> <ipc_handle> <instance_name> ...``.
    """
    if not argv or not argv[0].endswith(STUB_NAME) or len(argv) < 9:
        return None
    # <repository>/<model>/<version>/model.py names the model without guessing how the
    # instance name was suffixed (``m_0`` for one instance, ``m_0_1`` for several).
    model = Path(argv[1]).parent.parent.name
    return model, argv[8], argv[2]


def find_stubs(server_pid: int, proc: Path = Path("/proc")) -> list[Stub]:
    """Live stub processes whose parent is ``server_pid``."""
    stubs = []
    for pid in _children(server_pid, proc):
        try:
            raw = (proc / str(pid) / "cmdline").read_bytes()
        except OSError:
            continue
        parsed = parse_cmdline([a.decode(errors="replace") for a in raw.split(b"\0") if a])
        # A stub named after the model alone runs auto_complete_config while the model
        # loads, then exits; it can outlive the load call by a moment. Counting it as an
        # instance made its exit look like a death.
        if parsed and parsed[0] != parsed[1]:
            stubs.append(Stub(pid, *parsed))
    return stubs


def remove_shm_region(region: str, shm_dir: Path = SHM_DIR) -> bool:
    """Delete a dead stub's shared-memory region (a small leak Triton leaves behind)."""
    path = shm_dir / region.lstrip("/")
    if path.parent != shm_dir or not path.name.startswith("triton_python_backend_shm_region"):
        return False
    try:
        path.unlink()
        return True
    except FileNotFoundError:
        return False


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
