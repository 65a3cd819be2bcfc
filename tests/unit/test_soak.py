"""The soak's probes and its judgement of the goals, without a cluster."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from benchmarks.soak_probe import (
    Fault,
    Outcome,
    excused,
    gauge,
    judge,
    memory_drift,
    memory_split_by_role,
    pids_by_role,
    resident,
    shm_bytes,
)

KILL = Fault(at=100.0, kind="kill_replica", target="127.0.0.1:9001")
STUB = Fault(at=200.0, kind="kill_stub", target="127.0.0.1:9000", detail="llm_small_0_0")


def _ok(start: float = 0.0, replica: str = "127.0.0.1:9000") -> Outcome:
    return Outcome(start=start, end=start + 5, ok=True, streamed=True, replica=replica)


def _cut(
    start: float, end: float, replica: str, clean: bool = True, streamed: bool = True
) -> Outcome:
    return Outcome(
        start=start,
        end=end,
        ok=False,
        streamed=streamed,
        replica=replica,
        error="server_error",
        clean_error_event=clean,
    )


def test_only_streams_cut_by_their_own_replicas_kill_are_excused() -> None:
    faults = [KILL, STUB]
    assert excused(_cut(95, 101, "127.0.0.1:9001"), faults, grace=30)
    assert excused(_cut(190, 201, "127.0.0.1:9000"), faults, grace=30)  # the stub's replica
    # The other replica, no clean error event, nothing streamed yet, or started after the
    # kill (it should have gone elsewhere): each is a real failure.
    assert not excused(_cut(95, 101, "127.0.0.1:9000"), faults, grace=30)
    assert not excused(_cut(95, 101, "127.0.0.1:9001", clean=False), faults, grace=30)
    assert not excused(_cut(95, 101, "127.0.0.1:9001", streamed=False), faults, grace=30)
    assert not excused(_cut(101, 103, "127.0.0.1:9001"), faults, grace=30)
    assert not excused(_cut(95, 160, "127.0.0.1:9001"), faults, grace=30)  # ended long after


def _judge(outcomes: list[Outcome], **over: object) -> dict[str, tuple[bool, str]]:
    kwargs: dict[str, object] = {
        "back_in_rotation_s": 2.0,
        "memory_after_warmup": {"gateway": 100, "small-0/tritonserver": 1000},
        "memory_at_end": {"gateway": 105, "small-0/tritonserver": 1050},
        "shm_after_warmup": 2**20,
        "shm_at_end": 2**20,
        "slots_at_end": {"small-0/llm_small": 0.0},
    }
    kwargs.update(over)
    j = judge(outcomes, [KILL, STUB], **kwargs)  # type: ignore[arg-type]
    return {v.goal.split(" ")[0] + v.goal.split(" ")[1]: (v.met, v.detail) for v in j.verdicts}


def test_judge_passes_a_clean_run_and_names_each_failed_goal() -> None:
    good = _judge([_ok(1), _ok(2), _cut(95, 101, "127.0.0.1:9001")])
    assert all(met for met, _ in good.values()), good
    assert "1 failed, 1 of them streaming" in good["norequest"][1]

    bad = _judge(
        [_ok(1), _cut(95, 101, "127.0.0.1:9000")],
        back_in_rotation_s=12.5,
        memory_at_end={"gateway": 130, "small-0/tritonserver": 1000},
        shm_at_end=2 * 2**20,
        slots_at_end={"small-0/llm_small": 2.0},
    )
    assert not any(met for met, _ in bad.values()), bad
    assert "server_error x1" in bad["norequest"][1]
    assert "12.5 s" in bad["therestarted"][1]
    assert "gateway +30.0%" in bad["residentmemory"][1]
    assert "+100.0%" in bad["/dev/shmusage"][1]
    assert "small-0/llm_small=2" in bad["generationslots"][1]
    never = _judge([_ok(1)], back_in_rotation_s=None)
    assert not never["therestarted"][0]


def test_a_process_over_the_memory_goal_is_shown_split_into_own_and_shared_pages() -> None:
    mib = 2**20
    verdict = _judge(
        [_ok(1)],
        memory_after_warmup={"small-0/tritonserver": 40 * mib, "gateway": 100 * mib},
        memory_at_end={"small-0/tritonserver": 45 * mib, "gateway": 101 * mib},
        parts_after_warmup={
            "small-0/tritonserver": {"anon": 6 * mib, "shmem": 1 * mib, "file": 33 * mib},
            "gateway": {"anon": 90 * mib, "shmem": 0, "file": 10 * mib},
        },
        parts_at_end={
            "small-0/tritonserver": {"anon": 6 * mib, "shmem": 6 * mib, "file": 33 * mib},
            "gateway": {"anon": 91 * mib, "shmem": 0, "file": 10 * mib},
        },
    )["residentmemory"]
    assert not verdict[0]  # judged on resident memory, as the goal is written
    assert (
        "small-0/tritonserver: anon 6.0 -> 6.0 MiB (+0.0%), shmem 1.0 -> 6.0 MiB (+500.0%), "
        "file 33.0 -> 33.0 MiB (+0.0%)"
    ) in verdict[1]
    assert "gateway: anon" not in verdict[1]  # within the goal: no split


def test_memory_drift_compares_roles_present_in_both() -> None:
    assert memory_drift({"a": 100, "b": 50, "gone": 10}, {"a": 110, "b": 40, "new": 5}) == {
        "a": 0.1,
        "b": -0.2,
    }


def test_gauge_reads_labelled_samples_of_a_prometheus_page() -> None:
    page = (
        "# HELP llm_engine_sequences Sequences\n"
        "# TYPE llm_engine_sequences gauge\n"
        'llm_engine_sequences{model="llm_small",state="active"} 3\n'
        'llm_engine_sequences{model="llm_small",state="waiting"} 1\n'
        'llm_engine_sequences{model="llm_medium",state="active"} 0\n'
    )
    assert gauge(page, "llm_engine_sequences", state="active") == [3.0, 0.0]
    assert gauge(page, "llm_engine_sequences", model="llm_small", state="waiting") == [1.0]
    assert gauge(page, "nv_inference_count") == []


def test_memory_split_reads_live_processes_and_skips_gone_ones() -> None:
    """One read of each process's status gives its split and its total (VmRSS)."""
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == b"up\n"  # exec is done
        pids = pids_by_role({"small-0": child.pid, "small-1": None}, {"gateway": os.getpid()})
        assert pids == {"small-0/tritonserver": child.pid, "gateway": os.getpid()}
        roles = resident(memory_split_by_role(pids))
        assert set(roles) == {"small-0/tritonserver", "gateway"}  # a sleeping python has no stubs
        assert all(size > 1_000_000 for size in roles.values())
        parts = memory_split_by_role({"small-0/tritonserver": child.pid})
        assert set(parts) == {"small-0/tritonserver"}
        assert set(parts["small-0/tritonserver"]) == {"anon", "shmem", "file"}
        assert parts["small-0/tritonserver"]["anon"] > 1_000_000
        assert resident(parts) == {
            "small-0/tritonserver": sum(parts["small-0/tritonserver"].values())
        }
    finally:
        child.kill()
        child.wait()
    assert resident(memory_split_by_role({"small-0/tritonserver": child.pid})) == {}
    assert memory_split_by_role({"small-0/tritonserver": child.pid}) == {}


def test_shm_bytes_counts_allocated_blocks_not_sizes(tmp_path: Path) -> None:
    (tmp_path / "sparse").open("wb").truncate(64 * 2**20)  # 64 MiB long, nothing written
    (tmp_path / "full").write_bytes(b"x" * 2**20)
    used = shm_bytes(tmp_path)
    assert 2**20 <= used < 2 * 2**20


def test_memory_table_shows_each_moment_and_a_servers_heap_against_the_baseline() -> None:
    from benchmarks.soak import _memory_lines

    mib = 2**20

    def at(server: float, heap: float, stub: float) -> dict[str, object]:
        return {
            "memory": {
                "small-0/tritonserver": int(server * mib),
                "small-0/llm_small_0_0": int(stub * mib),
            },
            "parts": {"small-0/tritonserver": {"anon": int(heap * mib), "shmem": 0, "file": 0}},
        }

    report = {
        "peak_warmup": {
            "tokens": 256,
            "seconds": 61.0,
            "responses": {"a": 4096, "b": 2048},
            "sample": at(44, 12, 1300),
        },
        "warm_sample": at(45, 12.5, 1310),
        "loaded_end_sample": at(49.5, 16, 1310),
    }
    text = "\n".join(_memory_lines(report))
    assert (
        "streamed its pool's `max_in_flight` answers of 256 tokens at once (6144 responses in 61 s)"
        in text
    )
    assert "| process | warm-up burst | first fault (baseline) | load end | change |" in text
    assert "| small-0/tritonserver | 44.0 (12.0) | 45.0 (12.5) | 49.5 (16.0) | +10.0% |" in text
    assert "| small-0/llm_small_0_0 | 1300.0 | 1310.0 | 1310.0 | +0.0% |" in text

    del report["peak_warmup"]
    text = "\n".join(_memory_lines(report))
    assert "| process | first fault (baseline) | load end | change |" in text
    assert "max_in_flight" not in text
