"""Retraining on a team's labels loads a new ``intent_encoder`` version without a restart.

Runs ``scripts/retrain_intent.py`` against the session server (one short epoch on a small
synthetic file: this tests the flow, not the accuracy), then rolls back.
"""

from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import tritonclient.http as httpclient

from tests.conftest import ROOT

MODEL_DIR = ROOT / "model_repository" / "intent_encoder"
TOPICS = ["the sea", "a city", "winter", "a cat", "the moon", "a train", "music", "a garden"]
TOPICS += ["coffee", "rain", "a river", "the desert", "a library"]


def _script():
    spec = importlib.util.spec_from_file_location("retrain", ROOT / "scripts/retrain_intent.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def _classify(client, version: str = "") -> np.ndarray:
    text = httpclient.InferInput("text", [1, 1], "BYTES")
    text.set_data_from_numpy(np.array([[b"Write a haiku about snow."]], dtype=object))
    return client.infer("intent_encoder", [text], model_version=version).as_numpy("probabilities")


def test_retrain_loads_a_new_version_and_rolls_back(server, tmp_path):
    script = _script()
    client = httpclient.InferenceServerClient(server.http_url)
    before = _classify(client)
    new = MODEL_DIR / str(script.versions(MODEL_DIR)[-1] + 1)
    try:
        args = ["--data", str(_team_file(tmp_path)), "--server", server.http_url]
        assert script.main([*args, "--epochs", "1"]) == 0
        assert (new / "intent_encoder.npz").is_file() and (new / "report.md").is_file()
        assert "| recall |" in (new / "report.md").read_text()
        assert client.is_model_ready("intent_encoder", new.name)
        assert client.is_model_ready("intent_encoder", "1")  # kept for rollback
        np.testing.assert_allclose(_classify(client, "1"), before, atol=1e-6)
        assert not np.allclose(_classify(client, new.name), before, atol=1e-3)

        assert script.main(["--rollback", "--server", server.http_url]) == 0
        assert not new.exists()
        assert not client.is_model_ready("intent_encoder", new.name)
        np.testing.assert_allclose(_classify(client), before, atol=1e-6)
    finally:
        if new.exists():
            shutil.rmtree(new)
            client.load_model("intent_encoder")
            client.load_model("intent_classifier")


def test_bad_training_data_is_refused_before_training(server, tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "Translate this.", "intent": "translation"}) + "\n")
    assert _script().main(["--data", str(path), "--server", server.http_url]) == 2
    assert "unknown intent 'translation'" in capsys.readouterr().err
    assert [v for v in _script().versions(MODEL_DIR) if v != 1] == []
