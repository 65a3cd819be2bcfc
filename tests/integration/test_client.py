"""The SDK and CLI against the real stack: embedding, classifier, tier ensembles, router."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from client import Client, InvalidInput
from serving.launcher import TritonLauncher

ROOT = Path(__file__).resolve().parents[2]
INTENTS = {"completion", "summarization", "question_answering"}
TIERS = {"llm_small", "llm_medium", "llm_large"}
PROTOCOLS = ("grpc", "http")
SUMMARIZE = (
    "Summarize: The Amazon rainforest covers much of the Amazon basin of South America. "
    "It is home to millions of species and plays a major role in the global climate."
)


def _client(server: TritonLauncher, protocol: str) -> Client:
    url = server.grpc_url if protocol == "grpc" else server.http_url
    return Client(url, protocol=protocol, timeout=300)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_embed_returns_unit_vectors(server: TritonLauncher, protocol: str) -> None:
    with _client(server, protocol) as client:
        vectors = client.embed(["a cat sat on the mat", "a kitten sat on a rug", "GDP grew 3%"])
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_classify_returns_an_intent_and_probabilities(
    server: TritonLauncher, protocol: str
) -> None:
    with _client(server, protocol) as client:
        result = client.classify(SUMMARIZE)
    assert result.intent in INTENTS
    assert len(result.probabilities) == 3 and sum(result.probabilities) == pytest.approx(
        1, abs=1e-3
    )
    assert result.confidence == pytest.approx(max(result.probabilities), abs=1e-3)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_tier_ensemble_streams_text(server: TritonLauncher, protocol: str) -> None:
    with _client(server, protocol) as client:
        chunks = list(client.generate("The capital of France is", stream=True, max_tokens=8))
        whole = client.generate("The capital of France is", max_tokens=8, temperature=0.0)
    assert chunks and "".join(c.text for c in chunks).strip()
    assert whole.text.strip()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_router_reports_intent_and_tier(server: TritonLauncher, protocol: str) -> None:
    with _client(server, protocol) as client:
        result = client.chat(SUMMARIZE, max_tokens=12)
    assert result.text.strip()
    assert result.intent in INTENTS and result.model in TIERS


def test_router_override_and_bad_override(server: TritonLauncher) -> None:
    with _client(server, "grpc") as client:
        forced = client.chat("Tell me a story", max_tokens=4, tier="llm_large")
        assert forced.model == "llm_large"
        with pytest.raises(InvalidInput, match="bogus"):
            client.chat("Tell me a story", max_tokens=4, tier="bogus")
        # The server stays up and the next request works.
        assert client.chat("Tell me a story", max_tokens=4).text.strip()


def test_breaking_out_of_a_router_stream_leaves_the_server_usable(server: TritonLauncher) -> None:
    with _client(server, "grpc") as client:
        for _ in client.chat("Write a long essay about the sea.", stream=True, max_tokens=200):
            break
        assert client.chat("Hello", max_tokens=4).text.strip()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "client", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_cli_chat_streams_and_names_intent_and_tier(server: TritonLauncher) -> None:
    proc = _cli("chat", SUMMARIZE, "--max-tokens", "16", "--url", server.grpc_url)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
    assert "intent: " in proc.stderr and "tier: llm_" in proc.stderr


def test_cli_models_and_missing_model(server: TritonLauncher) -> None:
    proc = _cli("models", "--json", "--url", server.http_url, "--protocol", "http")
    assert proc.returncode == 0, proc.stderr
    names = {row["name"] for row in json.loads(proc.stdout) if row["state"] == "READY"}
    assert {"embedding", "intent_classifier", "router", "llm_small_text"} <= names
    proc = _cli("classify", "hi", "--model", "nope", "--url", server.grpc_url)
    assert (
        proc.returncode == 1 and "ModelNotFound" in proc.stderr and "Traceback" not in proc.stderr
    )


def test_cli_bench_against_the_router(server: TritonLauncher, tmp_path: Path) -> None:
    proc = _cli(
        "bench",
        "--users",
        "2",
        "--requests",
        "4",
        "--warmup",
        "1",
        "--target",
        "router",
        "--output-tokens",
        "4,12",
        "--prompts",
        str(ROOT.parent / "shared" / "data" / "dolly_sample.jsonl"),
        "--sla-ttft-ms",
        "60000",
        "--output-dir",
        str(tmp_path),
        "--url",
        server.grpc_url,
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["succeeded"] == 4 and summary["ttft_ms"]["p50"] > 0
    assert sum(summary["routed"].values()) == 4
    assert (tmp_path / "latency_cdf.png").exists() and (tmp_path / "bench.json").exists()
