"""What the soak watches, and how it judges the run (issue 13, item 4).

Kept apart from ``benchmarks/soak.py`` (which drives the cluster, the load and the faults)
so that the judging is plain code with unit tests: ``tests/unit/test_soak.py``.

- :func:`memory_split_by_role` reads the resident memory of every process of the cluster,
  keyed by what the process *is* (``small-1/tritonserver``, ``small-1/llm_small_0_0``,
  ``gateway``), so a replica restarted with new pids is compared with its former self,
  split into the process's own memory and shared pages; :func:`resident` is its total.
- :func:`shm_bytes` is what ``/dev/shm`` really holds (allocated blocks, not sizes).
- :func:`gauge` reads one sample of a Prometheus text page.
- :func:`judge` checks the issue's goals against the request records, the fault times and
  the samples, and says in words which goal failed and by how much.
"""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from serving.stubs import SHM_DIR, find_stubs

#: The goals' numbers, from the issue.
MEMORY_TOLERANCE = 0.10
BACK_IN_ROTATION_S = 10.0


#: The resident split in ``/proc/<pid>/status``: VmRSS is the sum of the other three.
FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem")


def status_kib(pid: int) -> dict[str, int]:
    """``VmRSS``, ``RssAnon`` (the process's own heap and stacks), ``RssFile`` (mapped
    files) and ``RssShmem`` (shared memory it has touched, such as a stub's ``/dev/shm``
    region) of ``pid``, in KiB. Raises OSError when the process is gone."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in FIELDS:
            out[key] = int(value.split()[0])
    return out


def pids_by_role(
    servers: Mapping[str, int | None], others: Mapping[str, int | None]
) -> dict[str, int]:
    """The pid of every role.

    ``servers`` maps a replica's name (``small-1``) to its tritonserver pid; each server
    and each of its Python stubs become a role (``small-1/tritonserver``,
    ``small-1/<model instance>``). ``others`` are single processes (``gateway``).
    """
    out: dict[str, int] = {}
    for name, pid in servers.items():
        if pid is None:
            continue
        out[f"{name}/tritonserver"] = pid
        for stub in find_stubs(pid):
            out[f"{name}/{stub.instance}"] = stub.pid
    out.update({name: pid for name, pid in others.items() if pid is not None})
    return out


def memory_split_by_role(pids: Mapping[str, int]) -> dict[str, dict[str, int]]:
    """Per role of :func:`pids_by_role`, the bytes of :func:`status_kib`'s split without
    VmRSS: ``anon`` (the process's own), ``shmem`` and ``file`` (pages it shares). Gone
    processes are absent."""
    out: dict[str, dict[str, int]] = {}
    for role, pid in pids.items():
        try:
            kib = status_kib(pid)
        except OSError:
            continue
        out[role] = {
            "anon": kib["RssAnon"] * 1024,
            "shmem": kib["RssShmem"] * 1024,
            "file": kib["RssFile"] * 1024,
        }
    return out


def resident(parts: Mapping[str, Mapping[str, int]]) -> dict[str, int]:
    """Resident bytes per role (``VmRSS``) from :func:`memory_split_by_role`'s reading:
    the sum of its parts, so both come from one read of each process's status."""
    return {role: sum(split.values()) for role, split in parts.items()}


def cpu_name() -> str:
    """The CPU's model name and architecture, for a benchmark's report."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {platform.machine()}"
    return platform.processor()


def shm_bytes(shm_dir: Path = SHM_DIR) -> int:
    """Bytes allocated in ``shm_dir`` (tmpfs pages in use, which a sparse region does not
    fill), counted over every file, the Python backend's regions among them."""
    total = 0
    with os.scandir(shm_dir) as entries:
        for entry in entries:
            try:
                total += entry.stat(follow_symlinks=False).st_blocks * 512
            except OSError:
                continue  # removed while we looked
    return total


def samples(page: str, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
    """``(labels, value)`` of every sample of ``name`` in a Prometheus text page whose
    labels include ``labels``."""
    return [
        (sample.labels, sample.value)
        for family in text_string_to_metric_families(page)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    ]


def gauge(page: str, name: str, **labels: str) -> list[float]:
    """The values of :func:`samples` (an empty list when there is none)."""
    return [value for _, value in samples(page, name, **labels)]


@dataclass(frozen=True)
class Fault:
    """One injected fault: when (seconds since the load began), what, and where."""

    at: float
    kind: str  # kill_replica | restart_replica | kill_stub | rude_clients
    target: str  # the replica's gateway name (host:port), or "" for client faults
    detail: str = ""


@dataclass(frozen=True)
class Outcome:
    """One request as the soak saw it (from the load driver's record)."""

    start: float
    end: float
    ok: bool
    streamed: bool  # at least one token arrived before the end
    replica: str  # the gateway's x-route-replica ("" when it never answered)
    error: str = ""
    clean_error_event: bool = False  # ended by an SSE error event and [DONE]


@dataclass
class Verdict:
    goal: str
    met: bool
    detail: str


@dataclass
class Judgement:
    verdicts: list[Verdict] = field(default_factory=list)

    def add(self, goal: str, met: bool, detail: str) -> None:
        self.verdicts.append(Verdict(goal, met, detail))

    @property
    def met(self) -> bool:
        return all(v.met for v in self.verdicts)

    def to_json(self) -> list[dict[str, Any]]:
        return [asdict(v) for v in self.verdicts]


def excused(outcome: Outcome, faults: Sequence[Fault], grace: float) -> bool:
    """A failure the goal allows: the request was already streaming from a replica when
    that replica (or one of its stubs) was killed, and it ended with a clean error event
    within ``grace`` seconds of the kill."""
    if outcome.ok or not outcome.streamed or not outcome.clean_error_event:
        return False
    for fault in faults:
        if fault.kind not in ("kill_replica", "kill_stub") or fault.target != outcome.replica:
            continue
        if outcome.start <= fault.at <= outcome.end <= fault.at + grace:
            return True
    return False


def judge(
    outcomes: Sequence[Outcome],
    faults: Sequence[Fault],
    *,
    back_in_rotation_s: float | None,
    memory_after_warmup: Mapping[str, int],
    memory_at_end: Mapping[str, int],
    shm_after_warmup: int,
    shm_at_end: int,
    slots_at_end: Mapping[str, float],
    grace: float = 30.0,
    parts_after_warmup: Mapping[str, Mapping[str, int]] | None = None,
    parts_at_end: Mapping[str, Mapping[str, int]] | None = None,
) -> Judgement:
    """The issue's goals, each with the numbers behind the answer.

    Memory is judged on resident memory, as the goal says. Given samples of
    :func:`memory_split_by_role`, each process over the tolerance also gets its split:
    how much of the change is its own memory (``anon``) and how much shared pages."""
    j = Judgement()
    failed = [o for o in outcomes if not o.ok]
    unexcused = [o for o in failed if not excused(o, faults, grace)]
    kinds: dict[str, int] = {}
    for o in unexcused:
        kinds[o.error or "unknown"] = kinds.get(o.error or "unknown", 0) + 1
    j.add(
        "no request fails unless it was streaming from the killed replica, and those end "
        "with a clean error event",
        not unexcused,
        f"{len(outcomes)} requests, {len(failed)} failed, {len(failed) - len(unexcused)} of "
        f"them streaming from a killed replica with a clean error event; not excused: "
        + (", ".join(f"{k} x{n}" for k, n in sorted(kinds.items())) or "none"),
    )
    if back_in_rotation_s is None:
        j.add(
            "the restarted replica is back in rotation within 10 s of being ready",
            False,
            "it never came back into rotation",
        )
    else:
        j.add(
            "the restarted replica is back in rotation within 10 s of being ready",
            back_in_rotation_s <= BACK_IN_ROTATION_S,
            f"{back_in_rotation_s:.1f} s from ready to the gateway's first request on it",
        )
    drift = memory_drift(memory_after_warmup, memory_at_end)
    worst = max(drift.items(), key=lambda kv: abs(kv[1]), default=("-", 0.0))
    over = {k: v for k, v in drift.items() if abs(v) > MEMORY_TOLERANCE}
    j.add(
        "resident memory of every process ends within 10% of where it was after warm-up",
        not over,
        f"{len(drift)} processes compared; largest change {worst[0]} {worst[1]:+.1%}"
        + (
            f"; over 10%: {', '.join(f'{k} {v:+.1%}' for k, v in sorted(over.items()))}"
            if over
            else ""
        )
        + "".join(
            f"; {role}: {split_change(parts_after_warmup[role], parts_at_end[role])}"
            for role in sorted(over)
            if parts_after_warmup
            and parts_at_end
            and role in parts_after_warmup
            and role in parts_at_end
        ),
    )
    shm_change = (shm_at_end - shm_after_warmup) / shm_after_warmup if shm_after_warmup else 0.0
    j.add(
        "/dev/shm usage ends within 10% of where it was after warm-up",
        abs(shm_change) <= MEMORY_TOLERANCE,
        f"{shm_after_warmup / 2**20:.1f} MiB after warm-up, {shm_at_end / 2**20:.1f} MiB at "
        f"the end ({shm_change:+.1%})",
    )
    busy = {k: v for k, v in slots_at_end.items() if v != 0}
    j.add(
        "generation slots return to zero when the load stops",
        not busy,
        f"{len(slots_at_end)} gauges read; non-zero: "
        + (", ".join(f"{k}={v:g}" for k, v in sorted(busy.items())) or "none"),
    )
    return j


def split_change(before: Mapping[str, int], after: Mapping[str, int]) -> str:
    """``anon 6.0 -> 6.1 MiB (+1.7%), shmem ..., file ...``: one process's resident split
    at two samples."""
    return ", ".join(
        f"{part} {before[part] / 2**20:.1f} -> {after[part] / 2**20:.1f} MiB"
        + (f" ({(after[part] - before[part]) / before[part]:+.1%})" if before[part] else "")
        for part in ("anon", "shmem", "file")
    )


def memory_drift(before: Mapping[str, int], after: Mapping[str, int]) -> dict[str, float]:
    """Relative change per role present in both."""
    return {k: (after[k] - before[k]) / before[k] for k in before if k in after and before[k] > 0}


def series(samples: Iterable[Mapping[str, Any]], key: str) -> list[tuple[float, Any]]:
    """``(t, sample[key])`` for each sample that has ``key``."""
    return [(s["t"], s[key]) for s in samples if key in s]
