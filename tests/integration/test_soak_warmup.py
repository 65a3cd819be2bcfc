"""The soak's warm-up burst against a real tritonserver: every LLM replica gets its pool's
``max_in_flight`` answers at once, each running to the asked length."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from benchmarks.soak import peak_warmup
from serving.launcher import TritonLauncher


def test_warmup_streams_each_llm_replicas_width_of_full_length_answers(
    server: TritonLauncher,
) -> None:
    one = SimpleNamespace(index=0, grpc_url=server.grpc_url)
    cluster = SimpleNamespace(
        source={
            "pools": [
                {"name": "front", "models": ["intent_classifier"], "max_in_flight": 4},
                {"name": "small", "models": ["llm_small"], "max_in_flight": 3},
                {"name": "idle", "models": ["llm_large"], "max_in_flight": 2},
            ]
        },
        replicas={"front": [one], "small": [one]},  # the "idle" pool started no replica
    )
    done = asyncio.run(peak_warmup(cluster, "Name one colour.", 5))  # type: ignore[arg-type]
    # 3 streams of 5 tokens each, one response per token: the end id matches no token, so
    # no answer stops early; the classifier pool and the pool without replicas get none.
    assert done["responses"] == {"small-0/llm_small": 15}
    assert done["tokens"] == 5
    assert done["seconds"] > 0
