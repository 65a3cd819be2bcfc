"""Retraining on a team's labels loads a new ``intent_head`` version without a restart.

Runs ``scripts/retrain_intent.py`` against a server of its own, started by the project's
launcher on a copy of the intent models (so the checkout's repository is never written),
then rolls back. The team file is small and synthetic: this tests the flow, not accuracy.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.http as httpclient

from serving.launcher import LaunchOptions, TritonLauncher
from tests.conftest import ROOT

MODELS = ("intent_split", "intent_encoder", "intent_head", "intent_classifier")
TOPICS = ["the sea", "a city", "winter", "a cat", "the moon", "a train", "music", "a garden"]
TOPICS += ["coffee", "rain", "a river", "the desert", "a library"]
PROBE = "Write a haiku about snow."


def _script():
    spec = importlib.util.spec_from_file_location("retrain", ROOT / "scripts/retrain_intent.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def intent_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonLauncher]:
    repo = tmp_path_factory.mktemp("intent_repo")
    for model in MODELS:
        shutil.copytree(ROOT / "model_repository" / model, repo / model)
    options = LaunchOptions.on_free_ports(
        repository=repo,
        models=["intent_classifier"],
        log_path=repo.parent / "server.log",
        ready_timeout=600,
    )
    launcher = TritonLauncher(options)
    launcher.start()
    try:
        yield launcher
    finally:
        launcher.stop()


def _team_file(tmp_path):
    rows = []
    for t in TOPICS:
        rows.append({"text": f"Write a short poem about {t}.", "intent": "completion"})
        rows.append(
            {"text": f"Summarize this.\n\nA long text about {t}.", "intent": "summarization"}
        )
        rows.append({"text": f"What is known about {t}?", "intent": "question_answering"})
    path = tmp_path / "team.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _probabilities(client: httpclient.InferenceServerClient) -> np.ndarray:
    text = httpclient.InferInput("text", [1, 1], "BYTES")
    text.set_data_from_numpy(np.array([[PROBE.encode()]], dtype=object))
    return client.infer("intent_classifier", [text]).as_numpy("probabilities")


def test_retrain_loads_a_new_version_keeps_the_old_and_rolls_back(intent_server, tmp_path):
    script = _script()
    repo = intent_server.options.repository
    head_dir = repo / "intent_head"
    client = httpclient.InferenceServerClient(intent_server.http_url)
    before = _probabilities(client)
    args = ["--repository", str(repo), "--server", intent_server.http_url]
    assert script.main(["--data", str(_team_file(tmp_path)), *args]) == 0
    new = head_dir / "2"
    assert (new / "intent_head.npz").is_file() and (new / "model.py").is_file()
    report = (new / "report.md").read_text()
    assert "| recall |" in report and "expected calibration error" in report
    assert client.is_model_ready("intent_head", "2")
    assert client.is_model_ready("intent_head", "1")  # kept for rollback
    after = _probabilities(client)
    assert not np.allclose(after, before, atol=1e-3)  # the ensemble serves the new head
    assert after.argmax() == 0  # completion, what the team's rows teach

    assert script.main(["--rollback", *args]) == 0
    assert not new.exists()
    assert not client.is_model_ready("intent_head", "2")
    np.testing.assert_allclose(_probabilities(client), before, atol=1e-6)


def test_bad_training_data_is_refused_before_training(intent_server, tmp_path, capsys):
    rows = [
        {"text": "Translate this.", "intent": "translation"},
        {"text": "   ", "intent": "completion"},
        {"text": "Write a poem.", "intent": "completion"},
        {"text": "write a  POEM.", "intent": "completion"},
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
    repo = intent_server.options.repository
    code = _script().main(
        ["--data", str(path), "--repository", str(repo), "--server", intent_server.http_url]
    )
    assert code == 2
    err = capsys.readouterr().err
    for needle in (
        "line 1: unknown intent 'translation'",
        "line 2: empty text",
        "line 4: duplicate of line 3",
        "line 5: not JSON",
        "intent 'summarization': 0 rows, at least 10 needed",
    ):
        assert needle in err
    assert _script().versions(repo / "intent_head") == [1]
