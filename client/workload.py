"""What the load generator sends: prompts, output lengths, arrival times.

Kept apart from the runner so the workload is reproducible from a seed and unit-tested.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Words for synthetic prompts: ordinary English, so a tokenizer sees about one token each.
_WORDS = [
    "the",
    "model",
    "server",
    "answers",
    "questions",
    "about",
    "weather",
    "travel",
    "history",
    "science",
    "music",
    "food",
    "language",
    "cities",
    "rivers",
    "mountains",
    "animals",
    "plants",
    "computers",
    "networks",
    "people",
    "stories",
    "markets",
    "energy",
    "water",
    "light",
    "time",
    "space",
    "ideas",
    "books",
    "games",
    "sports",
    "health",
    "design",
]


class WorkloadError(ValueError):
    """The workload cannot be built (bad prompts file, impossible options)."""


@dataclass(frozen=True)
class Job:
    """One request to send: the prompt and the output length to ask for (None: natural)."""

    prompt: str
    max_tokens: int | None


def _prompt_of(row: object, where: str) -> str:
    if isinstance(row, str):
        return row
    if not isinstance(row, dict):
        raise WorkloadError(f"{where}: expected a JSON object or string, got {type(row).__name__}")
    for key in ("prompt", "text", "text_input"):
        if isinstance(row.get(key), str):
            return row[key]
    if isinstance(row.get("instruction"), str):
        # Databricks Dolly rows: the instruction, with its context when there is one.
        context = row.get("context") or ""
        return f"{row['instruction']}\n\n{context}".strip() if context else row["instruction"]
    raise WorkloadError(f"{where}: no 'prompt', 'text' or 'instruction' field")


def load_prompts(path: Path) -> list[str]:
    """Prompts from a JSONL file (one object per line with prompt/text/instruction)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as exc:
        raise WorkloadError(f"prompts file not found: {path}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise WorkloadError(f"cannot read prompts file {path}: {exc}") from exc
    prompts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise WorkloadError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
        prompt = _prompt_of(row, f"{path}:{number}")
        if prompt.strip():
            prompts.append(prompt)
    if not prompts:
        raise WorkloadError(f"{path}: no prompts in the file")
    return prompts


def synthetic_prompts(words: int, count: int, seed: int) -> list[str]:
    """``count`` distinct prompts of exactly ``words`` words (no cache can serve them twice)."""
    if words < 1:
        raise WorkloadError(f"synthetic prompt length must be at least 1 word, got {words}")
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(words)) for _ in range(count)]


def jobs(prompts: Sequence[str], output_tokens: Sequence[int] | None, seed: int) -> Iterator[Job]:
    """An endless, seeded stream of jobs.

    ``output_tokens`` None means the natural length (no max_tokens sent); one value is a
    fixed length; several values are drawn at random per request, which gives the mixed
    short-and-long workload where long answers pile up on a replica.
    """
    rng = random.Random(seed)
    while True:
        length = None if not output_tokens else rng.choice(list(output_tokens))
        yield Job(prompt=rng.choice(list(prompts)), max_tokens=length)


def arrival_gaps(rate: float, burstiness: float, seed: int) -> Iterator[float]:
    """Inter-arrival gaps (s) for an open loop: gamma with mean 1/rate.

    ``burstiness`` is the gamma shape: 1.0 is a Poisson process, below 1 is burstier
    (clumps and lulls), above 1 is more regular. The mean rate is the same for all.
    """
    if rate <= 0:
        raise WorkloadError(f"rate must be positive, got {rate}")
    if burstiness <= 0:
        raise WorkloadError(f"burstiness must be positive, got {burstiness}")
    rng = np.random.default_rng(seed)
    scale = 1.0 / (rate * burstiness)
    while True:
        yield float(rng.gamma(burstiness, scale))


def output_caps(text: str) -> list[int]:
    """``"16,16,16,256"`` -> ``[16, 16, 16, 256]`` (an argparse type)."""
    try:
        caps = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected integers like 16,16,256, got {text!r}"
        ) from None
    if not caps or min(caps) < 1:
        raise argparse.ArgumentTypeError(f"output caps must be >= 1, got {text!r}")
    return caps


def add_closed_loop_arguments(
    parser: argparse.ArgumentParser,
    *,
    users: int,
    duration: float,
    output_tokens: Sequence[int],
    per: str = "run",
) -> None:
    """The closed-loop load options the replica benchmarks share: users, duration per
    ``per``, warm-up requests, unrecorded pre-warm, mixed output caps, seed."""
    parser.add_argument("--users", type=int, default=users, help="closed-loop users")
    parser.add_argument("--duration", type=float, default=duration, help=f"seconds per {per}")
    parser.add_argument("--warmup", type=int, default=4, help="uncounted warm-up requests")
    parser.add_argument(
        "--prewarm", type=float, default=30.0, help="seconds of unrecorded load before the runs"
    )
    parser.add_argument(
        "--output-tokens",
        type=output_caps,
        default=list(output_tokens),
        help="output caps drawn at random per request (short and long mixed)",
    )
    parser.add_argument("--seed", type=int, default=0)
