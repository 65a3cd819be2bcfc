"""Notice dead Python-backend stubs and bring their models back.

In Triton 2.51 a stub that dies (killed, out of memory, a crash in a library) is not
restarted: the model fails every request while ``/v2/health/ready`` says 200. The
supervisor compares the live stubs of each wanted model with how many it had after
loading; when one is missing it marks the model broken (deep health fails), removes the
dead stub's shared-memory region, and reloads the model with unload + load, then the
ensembles built on it.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from typing import TYPE_CHECKING

from serving.stubs import Stub, find_stubs, remove_shm_region

if TYPE_CHECKING:
    from serving.launcher import TritonLauncher

log = logging.getLogger("serving.supervisor")


class Supervisor:
    def __init__(self, launcher: TritonLauncher, interval: float = 1.0) -> None:
        self.launcher = launcher
        self.interval = interval
        self.expected: dict[str, int] = {}
        self.known: dict[int, Stub] = {}
        self._broken: set[str] = set()
        self.reloads: list[str] = []
        self._server_gone = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stub-supervisor", daemon=True)

    def start(self) -> None:
        self.refresh()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=10)

    def broken(self) -> list[str]:
        """Models known broken: marked by a pass, or missing a stub right now."""
        counts = _instances(self._stubs())
        dead = {m for m, n in self.expected.items() if counts.get(m, 0) < n}
        return sorted(self._broken | dead)

    def _stubs(self) -> list[Stub]:
        pid = self.launcher.pid
        return find_stubs(pid) if pid else []

    def refresh(self) -> None:
        """Take the current stubs of the wanted models as the healthy baseline."""
        stubs = self._stubs()
        wanted = set(self.launcher.wanted)
        self.expected = {m: n for m, n in _instances(stubs).items() if m in wanted}
        self.known = {s.pid: s for s in stubs}

    def server_exited(self) -> int | None:
        """tritonserver's exit code once it is gone (killed, crashed), else None."""
        proc = getattr(self.launcher, "process", None)
        return None if proc is None else proc.poll()

    def check(self) -> list[str]:
        """One pass: find models with dead stubs and reload them. Returns the models reloaded."""
        with self.launcher._lock:
            code = self.server_exited()
            if code is not None:
                # Its stubs died with it and there is no server to reload them in: say so
                # once (deep health already fails), instead of a failed reload per second.
                if not self._server_gone:
                    log.error(
                        "tritonserver exited (code %s); its models come back only when it is "
                        "started again",
                        code,
                    )
                    self._server_gone = True
                return []
            stubs = self._stubs()
            alive = {s.pid for s in stubs}
            for pid, stub in list(self.known.items()):
                if pid not in alive:
                    if remove_shm_region(stub.shm_region):
                        log.info(
                            "removed shared memory %s of dead stub %s",
                            stub.shm_region,
                            stub.instance,
                        )
                    del self.known[pid]
            counts = _instances(stubs)
            dead = sorted(m for m, n in self.expected.items() if counts.get(m, 0) < n)
            self._broken.update(dead)
            revived = []
            for model in dead:
                log.warning(
                    "stub of model '%s' died (%d of %d alive); reloading it",
                    model,
                    counts.get(model, 0),
                    self.expected[model],
                )
                try:
                    self.launcher.reload(model)
                except Exception:
                    log.exception("reloading '%s' failed; will retry", model)
                    continue
                self._broken.discard(model)
                self.reloads.append(model)
                revived.append(model)
                log.warning("model '%s' reloaded after its stub died", model)
            if revived:
                self.refresh()
            return revived

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check()
            except Exception:
                log.exception("supervisor pass failed")

    def clean_shm(self) -> None:
        """After the server stopped: remove regions its stubs may have left behind."""
        for stub in self.known.values():
            remove_shm_region(stub.shm_region)
        self.known.clear()


def _instances(stubs: list[Stub]) -> Counter[str]:
    """Live instances per model: stubs counted by instance name, not by process.

    Loading an ensemble reloads the models it is built from, and the replaced stub can
    outlive the load call by a moment, so one instance briefly has two stub processes.
    Counting processes took that moment as the baseline, and the old stub's exit a
    second later looked like a death: the supervisor reloaded a healthy model and deep
    health failed meanwhile (seen as 503s from the gateway right after start-up).
    """
    return Counter(model for model, _instance in {(s.model, s.instance) for s in stubs})
