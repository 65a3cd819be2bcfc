"""``python -m client``: one-line errors with a non-zero exit, and a bench run end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from client import cli
from serving.launcher import free_port
from tests.unit.client_fakes import FakeServer, text_chunks

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "client", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr
    assert any(all(n in line for n in needles) for line in lines[-1:]), proc.stderr


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_refused_connection(protocol: str) -> None:
    url = f"127.0.0.1:{free_port()}"
    proc = _run("models", "--url", url, "--protocol", protocol, "--timeout", "5")
    _one_line_error(proc, "ServerUnavailable", url)
    assert proc.returncode == cli.EXIT_ERROR


def test_wrong_address_is_one_line() -> None:
    proc = _run("classify", "hello", "--url", "no-such-host.invalid:8001", "--timeout", "10")
    _one_line_error(proc, "error")


def test_empty_prompt_and_negative_concurrency() -> None:
    _one_line_error(
        _run("chat", "   ", "--url", f"127.0.0.1:{free_port()}"), "InvalidInput", "prompt"
    )
    proc = _run("bench", "--users", "-4")
    assert (
        proc.returncode == 2
        and "must be at least 1" in proc.stderr
        and "Traceback" not in proc.stderr
    )


def test_malformed_prompts_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": \n')
    proc = _run(
        "bench", "--prompts", str(bad), "--requests", "1", "--url", f"127.0.0.1:{free_port()}"
    )
    _one_line_error(proc, "WorkloadError", "bad.jsonl:2", "not valid JSON")


def test_bench_end_to_end_against_a_fake(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    server = FakeServer(
        chunks=text_chunks(b"a", b"b", intent=b"completion", model=b"llm_small"), delay=0.001
    )
    monkeypatch.setattr(cli, "_client", lambda args: server)
    code = cli.main(
        [
            "bench",
            "--users",
            "3",
            "--requests",
            "12",
            "--warmup",
            "2",
            "--output-tokens",
            "4,64",
            "--sla-ttft-ms",
            "1000",
            "--output-dir",
            str(tmp_path),
            "--json",
        ]
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["requests"] == 12 and summary["errors"] == {}
    assert summary["routed"] == {"completion->llm_small": 12}
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["config"]["load"]["users"] == 3 and "-m client bench" in saved["config"]["command"]
    assert (tmp_path / "latency_cdf.png").exists() and (tmp_path / "ttft_over_time.png").exists()
    assert {int(inputs["max_tokens"][0]) for _, inputs in server.requests} <= {4, 64}


def test_chat_prints_answer_then_intent_and_tier(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    chunks = text_chunks(b"Short ", b"answer.", intent=b"summarization", model=b"llm_medium")
    chunks[0]["confidence"] = np.array([0.91], dtype=np.float32)
    monkeypatch.setattr(cli, "_client", lambda args: FakeServer(chunks=chunks))
    assert cli.main(["chat", "Summarize: a long text"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "Short answer.\n"
    assert "intent: summarization (0.91)" in captured.err and "tier: llm_medium" in captured.err
