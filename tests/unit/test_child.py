"""How the project starts child processes: serving/child.py and serving.runtime.child_command."""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil

from serving.runtime import child_command

REPO = Path(__file__).resolve().parents[2]


def _run(code: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # type: ignore[call-overload, no-any-return]
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        **kwargs,
    )


def test_the_command_keeps_the_pid_and_environment_and_is_pinned() -> None:
    report = (
        "import json, os; "
        "print(json.dumps([os.getpid(), sorted(os.sched_getaffinity(0)), os.environ['MARK']]))"
    )
    process = subprocess.Popen(
        child_command([sys.executable, "-c", report], cpus={0}),
        stdout=subprocess.PIPE,
        env={**os.environ, "MARK": "kept"},
    )
    out, _ = process.communicate(timeout=30)
    assert process.returncode == 0
    assert json.loads(out) == [process.pid, [0], "kept"]


def test_the_death_signal_is_asked_for_from_the_main_thread_only() -> None:
    here = child_command(["true"], death_signal=signal.SIGKILL)
    assert here[here.index("--death-signal") + 1] == str(int(signal.SIGKILL))
    assert here[here.index("--parent") + 1] == str(os.getpid())
    assert here[-2:] == ["--", "true"]
    from_thread: list[list[str]] = []
    worker = threading.Thread(target=lambda: from_thread.append(child_command(["true"])))
    worker.start()
    worker.join()
    assert "--death-signal" not in from_thread[0]
    assert from_thread[0][-2:] == ["--", "true"]


def test_the_command_dies_with_a_sigkilled_starter() -> None:
    starter = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                """
                import subprocess, sys, time
                from serving.runtime import child_command
                child = subprocess.Popen(child_command(["sleep", "300"]))
                print(child.pid, flush=True)
                time.sleep(300)
                """
            ),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert starter.stdout is not None
    child = psutil.Process(int(starter.stdout.readline()))
    deadline = time.monotonic() + 10
    while child.name() != "sleep" and time.monotonic() < deadline:  # exec'd in place
        time.sleep(0.02)
    assert child.name() == "sleep"
    starter.kill()
    starter.wait(timeout=10)
    _gone, alive = psutil.wait_procs([child], timeout=10)
    assert alive == []


def test_a_starter_gone_before_the_signal_was_armed_means_the_command_never_runs(
    tmp_path: Path,
) -> None:
    marker = tmp_path / "ran"
    wrapper = child_command(["touch", str(marker)], death_signal=signal.SIGTERM)
    wrapper[wrapper.index("--parent") + 1] = "1"  # not the process that starts it
    result = subprocess.run(wrapper, timeout=30)
    assert result.returncode == -signal.SIGTERM
    assert not marker.exists()


def test_a_missing_program_is_exit_127_with_its_name() -> None:
    result = subprocess.run(
        child_command(["/nonexistent/tritonserver"]), capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 127
    assert "cannot run /nonexistent/tritonserver" in result.stderr


def test_children_started_beside_a_live_grpc_event_engine_reach_exec() -> None:
    """The CI failure this design fixes: with a ``preexec_fn``, gRPC's fork handlers made
    22 of 1,250 children abort before exec ("Epoll1Poller ... epoll_wait error: Bad file
    descriptor"), so 250 such starts all reaching exec had about a 1% chance then."""
    result = _run(
        """
        import asyncio, subprocess, sys, tempfile
        import grpc
        import tritonclient.grpc.aio as aio
        from serving.runtime import child_command, process_group

        async def touch_the_engine():
            client = aio.InferenceServerClient("127.0.0.1:1")
            try:
                await client.is_server_live(client_timeout=0.2)
            except Exception:
                pass
            await client.close()

        asyncio.run(touch_the_engine())
        channel = grpc.insecure_channel("127.0.0.1:1")  # and a live sync channel beside it
        failures = []
        for _ in range(250):
            with tempfile.TemporaryFile() as log:
                child = subprocess.Popen(
                    child_command(["true"], death_signal=9),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    **process_group(),
                )
                code = child.wait()
                log.seek(0)
                said = log.read()
            if code != 0 or said:
                failures.append((code, said.decode(errors="replace")[:200]))
        print(failures)
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_nothing_in_the_project_starts_a_child_with_a_preexec_fn() -> None:
    """The one exception is :func:`process_group` on Python 3.10, which has no other way."""
    offenders = []
    for folder in ("serving", "gateway", "client", "benchmarks", "build_engines", "scripts"):
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.keyword) and node.arg == "preexec_fn":
                    offenders.append(f"{path.relative_to(REPO)}:{node.value.lineno}")
    assert offenders == []
