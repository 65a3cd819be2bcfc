"""The load generator without a server: workload, timing, loops, summary, report files."""

from __future__ import annotations

import asyncio
import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from client.errors import InvalidInput, ModelNotFound
from client.loadgen import LoadShape, Target, request_stream, run
from client.metrics import RequestRecord, distribution, measure, meets_sla, summarize
from client.report import summary_table, write_json, write_plots
from client.sdk import Chunk
from client.workload import WorkloadError, arrival_gaps, jobs, load_prompts, synthetic_prompts
from tests.unit.client_fakes import FakeServer, text_chunks

DOLLY = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "dolly_sample.jsonl"


def test_load_prompts_reads_prompt_text_and_dolly_rows(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    rows = [
        {"prompt": "a"},
        {"text": "b"},
        {"instruction": "c", "context": "ctx"},
        {"instruction": "d"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert load_prompts(path) == ["a", "b", "c\n\nctx", "d"]


@pytest.mark.skipif(not DOLLY.exists(), reason="../shared/data is not beside this checkout")
def test_load_prompts_reads_the_dolly_sample() -> None:
    prompts = load_prompts(DOLLY)
    assert len(prompts) > 100 and all(p.strip() for p in prompts)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"prompt": "a"}\n{not json\n', r":2: not valid JSON"),
        ('{"other": 1}\n', "no 'prompt'"),
        ("[1, 2]\n", "expected a JSON object"),
        ("\n\n", "no prompts"),
    ],
)
def test_malformed_prompts_file_names_the_line(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(WorkloadError, match=message):
        load_prompts(path)


def test_missing_prompts_file() -> None:
    with pytest.raises(WorkloadError, match="not found"):
        load_prompts(Path("/nonexistent/prompts.jsonl"))


def test_synthetic_prompts_have_the_asked_length_and_are_seeded() -> None:
    prompts = synthetic_prompts(12, 5, seed=3)
    assert all(len(p.split()) == 12 for p in prompts)
    assert prompts == synthetic_prompts(12, 5, seed=3)
    with pytest.raises(WorkloadError):
        synthetic_prompts(0, 1, seed=0)


def test_jobs_fixed_natural_and_mixed_lengths() -> None:
    assert {j.max_tokens for j in itertools.islice(jobs(["p"], None, 0), 10)} == {None}
    assert {j.max_tokens for j in itertools.islice(jobs(["p"], [16], 0), 10)} == {16}
    mixed = [j.max_tokens for j in itertools.islice(jobs(["p"], [8, 256], 0), 200)]
    assert set(mixed) == {8, 256} and 60 < mixed.count(8) < 140


@pytest.mark.parametrize("burstiness", [0.25, 1.0, 4.0])
def test_arrival_gaps_keep_the_mean_rate(burstiness: float) -> None:
    gaps = np.array(list(itertools.islice(arrival_gaps(20.0, burstiness, seed=1), 20000)))
    assert gaps.mean() == pytest.approx(1 / 20, rel=0.05)
    # Lower shape = burstier: the coefficient of variation is 1/sqrt(shape).
    assert gaps.std() / gaps.mean() == pytest.approx(1 / np.sqrt(burstiness), rel=0.1)


def test_load_shape_rejects_impossible_options() -> None:
    for shape in (
        LoadShape(duration=1),
        LoadShape(users=2, rate=1.0, duration=1),
        LoadShape(users=0, duration=1),
        LoadShape(users=1),
        LoadShape(rate=-1.0, duration=1),
        LoadShape(users=1, requests=0),
        LoadShape(users=1, duration=1, warmup=-1),
    ):
        with pytest.raises(WorkloadError):
            shape.validate()


async def _chunks(times: list[float], texts: list[str], reported: int | None = None):
    for i, (gap, text) in enumerate(zip(times, texts, strict=True)):
        await asyncio.sleep(gap)
        last = i == len(texts) - 1
        yield Chunk(
            text=text, intent="qa", model="llm_small", num_output_tokens=reported if last else None
        )


def test_measure_records_ttft_gaps_and_tokens() -> None:
    record = asyncio.run(
        measure(_chunks([0.05, 0.02, 0.02], ["a", "b", "c"]), started=_now(), origin=0.0)
    )
    assert record.ok and record.output_tokens == 3
    assert record.ttft == pytest.approx(0.05, abs=0.03)
    gaps = record.inter_chunk_latencies
    assert len(gaps) == 2 and all(g >= 0.015 for g in gaps)
    itl = (record.token_times[-1] - record.ttft) / 2
    assert record.inter_token_latency == pytest.approx(itl)
    assert record.e2e >= record.token_times[-1]
    assert (record.intent, record.model) == ("qa", "llm_small")
    reported = asyncio.run(measure(_chunks([0, 0], ["a", "b"], reported=7), _now(), 0.0))
    assert reported.output_tokens == 7


def test_measure_records_errors_by_kind() -> None:
    async def failing():
        yield Chunk(text="a")
        raise InvalidInput("'max_tokens' must be positive")

    record = asyncio.run(measure(failing(), _now(), 0.0))
    assert record.error == "invalid_input" and "max_tokens" in record.error_message


def _now() -> float:
    import time

    return time.perf_counter()


def _record(
    start: float, ttft: float, gaps: list[float], error: str | None = None
) -> RequestRecord:
    times = [ttft]
    for gap in gaps:
        times.append(times[-1] + gap)
    return RequestRecord(
        start=start,
        e2e=times[-1],
        ttft=ttft,
        token_times=times,
        output_tokens=len(times),
        error=error,
    )


def test_summary_percentiles_rates_goodput_and_errors() -> None:
    records = [
        _record(0, 0.1, [0.02, 0.02, 0.02]),
        _record(1, 0.3, [0.02, 0.02, 0.02]),
        _record(2, 0.1, [0.2, 0.2, 0.2]),
        RequestRecord(start=3, e2e=0.01, error="invalid_input"),
    ]
    s = summarize(records, wall_time=4.0, sla_ttft_ms=200, sla_itl_ms=50)
    assert s["requests"] == 4 and s["succeeded"] == 3
    assert s["errors"] == {"invalid_input": 1}
    assert s["requests_per_s"] == pytest.approx(0.75)
    assert s["output_tokens_per_s"] == pytest.approx(12 / 4.0)
    assert s["ttft_ms"]["p50"] == pytest.approx(100.0)
    assert s["ttft_ms"]["mean"] == pytest.approx(500 / 3)
    assert s["inter_chunk_latency_ms"]["count"] == 9
    assert s["inter_token_latency_ms"]["p50"] == pytest.approx(20.0)
    assert s["goodput"]["good_requests"] == 1
    assert s["goodput"]["fraction"] == pytest.approx(0.25)
    assert s["output_tokens_per_s_per_user"]["p50"] == pytest.approx(50.0)
    assert meets_sla(records[0], None, None) and not meets_sla(records[3], None, None)


def test_inter_token_latency_ends_at_the_last_text_not_the_stream_end() -> None:
    # aiperf's ITL: (last content chunk - first) / (tokens - 1); a slow final
    # flags-only response (e2e) is not decode time. 5 tokens in 2 chunks: ICL != ITL.
    record = RequestRecord(start=0, e2e=1.0, ttft=0.1, token_times=[0.1, 0.5], output_tokens=5)
    assert record.inter_token_latency == pytest.approx(0.1)
    assert record.inter_chunk_latencies == [pytest.approx(0.4)]
    assert meets_sla(record, None, sla_itl_ms=150) and not meets_sla(record, None, sla_itl_ms=50)
    assert record.to_json()["inter_token_latency"] == pytest.approx(0.1)


def test_distribution_of_nothing() -> None:
    assert distribution([])["p99"] is None and distribution([])["count"] == 0


def _send_to(server: FakeServer, target: Target = Target.LLM_SMALL):
    return lambda job: request_stream(server, target, job, temperature=0.0)


def test_closed_loop_keeps_users_busy_and_skips_warmup() -> None:
    server = FakeServer(chunks=text_chunks(b"a", b"b", b"c"), delay=0.002)
    shape = LoadShape(users=4, requests=20, warmup=3)
    result = asyncio.run(run(_send_to(server), jobs(["hi"], [3], 0), shape))
    assert len(result.records) == 20 and all(r.ok and r.output_tokens == 3 for r in result.records)
    assert len(server.requests) == 23  # 3 warm-up requests were sent but not recorded
    assert server.in_flight_peak == 4
    model, inputs = server.requests[-1]
    assert model == "llm_small_text" and inputs["max_tokens"][0] == 3


def test_closed_loop_stops_at_the_duration() -> None:
    server = FakeServer(chunks=text_chunks(b"a"), delay=0.01)
    result = asyncio.run(
        run(_send_to(server), jobs(["hi"], None, 0), LoadShape(users=2, duration=0.2))
    )
    assert 4 <= len(result.records) <= 60
    assert result.wall_time < 1.0


def test_open_loop_sends_at_the_rate_without_waiting_for_answers() -> None:
    server = FakeServer(chunks=text_chunks(b"a", b"b"), delay=0.05)
    shape = LoadShape(rate=200.0, requests=30, seed=2)
    result = asyncio.run(run(_send_to(server), jobs(["hi"], None, 0), shape))
    assert len(result.records) == 30
    assert server.in_flight_peak > 3  # arrivals overlap: an open loop does not wait
    capped = FakeServer(chunks=text_chunks(b"a", b"b"), delay=0.05)
    shape = LoadShape(rate=200.0, requests=30, max_concurrency=2, seed=2)
    asyncio.run(run(_send_to(capped), jobs(["hi"], None, 0), shape))
    assert capped.in_flight_peak == 2


def test_router_and_embedding_targets() -> None:
    router = FakeServer(chunks=text_chunks(b"x", intent=b"completion", model=b"llm_small"))
    result = asyncio.run(
        run(_send_to(router, Target.ROUTER), jobs(["hi"], None, 0), LoadShape(users=1, requests=2))
    )
    assert router.requests[0][0] == "router"
    assert summarize(result.records, result.wall_time)["routed"] == {"completion->llm_small": 2}
    embed = FakeServer(infer_result=lambda _: {"embedding": np.zeros((1, 384), np.float32)})
    result = asyncio.run(
        run(
            _send_to(embed, Target.EMBEDDING), jobs(["hi"], None, 0), LoadShape(users=2, requests=4)
        )
    )
    assert all(r.ok and r.ttft == r.token_times[0] for r in result.records)
    assert embed.requests[0][0] == "embedding"


def test_report_writes_json_and_plots(tmp_path: Path) -> None:
    records = [_record(i * 0.1, 0.05 + i * 0.01, [0.02] * 4) for i in range(20)]
    records.append(RequestRecord(start=1.0, e2e=0.01, error="timeout"))
    summary = summarize(records, 3.0, sla_ttft_ms=100)
    write_json(tmp_path / "bench.json", summary, {"command": "x"}, records)
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["summary"]["errors"] == {"timeout": 1} and len(data["requests"]) == 21
    paths = write_plots(tmp_path, records, "test")
    assert [p.name for p in paths] == ["latency_cdf.png", "ttft_over_time.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)
    assert summary_table(summary, "t").row_count > 5


def test_warmup_that_fails_entirely_stops_the_run() -> None:
    server = FakeServer(error=ModelNotFound("Request for unknown model: 'x' is not found"))
    shape = LoadShape(users=4, duration=30, warmup=2)
    with pytest.raises(ModelNotFound, match="every warm-up request failed: Request for unknown"):
        asyncio.run(run(_send_to(server), jobs(["hi"], None, 0), shape))
    assert len(server.requests) == 2


def test_closed_loop_pauses_after_an_unreachable_server() -> None:
    from client.errors import ServerUnavailable

    class GoesDown(FakeServer):
        async def stream_tensors(self, model, inputs, request_id=""):  # type: ignore[no-untyped-def]
            self.requests.append((model, inputs))
            if len(self.requests) > 2:
                raise ServerUnavailable("connection refused")
            yield text_chunks(b"a")[0]

    server = GoesDown()
    result = asyncio.run(
        run(_send_to(server), jobs(["hi"], None, 0), LoadShape(users=1, duration=0.5))
    )
    errors = [r for r in result.records if not r.ok]
    assert {r.error for r in errors} == {"unavailable"}
    assert 2 <= len(errors) <= 7  # about one per 100 ms pause, not thousands


def test_closed_loop_arguments_parse_mixed_output_caps() -> None:
    import argparse

    from client.workload import add_closed_loop_arguments

    parser = argparse.ArgumentParser()
    add_closed_loop_arguments(parser, users=30, duration=600.0, output_tokens=[16, 256])
    args = parser.parse_args(["--output-tokens", "16,16,16,256", "--duration", "45"])
    assert args.output_tokens == [16, 16, 16, 256] and args.duration == 45.0
    assert (args.users, args.warmup, args.seed) == (30, 4, 0)
    assert parser.parse_args([]).output_tokens == [16, 256]
    for bad in ("16,x", "0,16"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--output-tokens", bad])
