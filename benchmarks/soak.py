"""The seed's soak, with faults: 30 users for 10 minutes through the gateway (issue 13, item 4).

Starts the ``pools`` topology on this machine (:class:`gateway.cluster.LocalCluster`: a
Triton per pool replica, two replicas of the small tier, the gateway in front) and drives
a closed loop of ``--users`` through the gateway's OpenAI API with Dolly prompts and mixed
output lengths: two thirds of the users name the small tier (its two replicas are where
the faults land), one third send ``model: auto`` (the classifier on the front pool picks
the tier). Before the load, every LLM replica streams as many answers of the largest cap
at once as the gateway allows it (:func:`peak_warmup`), so that the after-warm-up memory
sample already holds the heap's high-water mark. During the run it

- SIGKILLs replica 1 of the small pool at 25 % of the run, and restarts it 15 s later;
- SIGKILLs the ``llm_small`` Python stub of replica 0 at 60 % (the launcher's supervisor
  must bring it back);
- at 45 % opens clients that disconnect mid-stream and clients that read very slowly.

Every 2 s it samples the resident memory of every process (each tritonserver, each stub,
the gateway) and ``/dev/shm``. When the load stops it waits for the work to drain, reads
every tier's active-sequence gauge and the gateway's in-flight gauges, samples memory
again and judges the issue's goals (:mod:`benchmarks.soak_probe`):

- no request fails unless it was already streaming from the killed replica (or stub), and
  those end with a clean error event;
- the restarted replica is back in rotation within 10 s of being ready;
- resident memory of every process and ``/dev/shm`` end within 10 % of where they were
  after warm-up;
- generation slots return to zero when the load stops.

Results: ``benchmarks/results/soak.{json,md}`` and plots in ``benchmarks/results/soak/``
(latency and errors over time with the fault times marked, memory over time). The full
run is the default (600 s); ``--duration`` makes a shorter one. Run it alone::

    flock /tmp/bench.lock .venv/bin/python benchmarks/soak.py
    flock /tmp/bench.lock .venv/bin/python benchmarks/soak.py --duration 120 --out /tmp/soak

Prompts: the Databricks Dolly 15k sample (CC BY-SA 3.0).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

REPO = Path(__file__).resolve().parents[1]
# benchmarks/gateway.py would shadow the gateway package: the repository goes first.
sys.path.insert(0, str(REPO))
from benchmarks.soak_probe import (  # noqa: E402
    Fault,
    Judgement,
    Outcome,
    cpu_name,
    gauge,
    judge,
    memory_drift,
    memory_split_by_role,
    pids_by_role,
    resident,
    samples,
    shm_bytes,
)
from client.loadgen import LoadShape  # noqa: E402
from client.metrics import RequestRecord, summarize  # noqa: E402
from client.openai_load import openai_load  # noqa: E402
from client.report import mark_events, write_plots  # noqa: E402
from client.sdk import AsyncClient  # noqa: E402
from client.workload import jobs, load_prompts  # noqa: E402
from gateway import manifests  # noqa: E402
from gateway.cluster import LocalCluster  # noqa: E402
from gateway.config import DEFAULT_ROUTER_CONFIG, RoutingSettings  # noqa: E402
from gateway.service import tier_inputs  # noqa: E402
from gateway.tokenizer import load as load_tokenizer  # noqa: E402
from serving.stubs import find_stubs  # noqa: E402

ROOT = REPO
DOLLY = ROOT.parent / "shared" / "data" / "dolly_sample.jsonl"
RESULTS = ROOT / "benchmarks" / "results"
POOL = "small"
TIER = "llm_small"
SAMPLE_EVERY_S = 2.0


@dataclass
class Rude:
    """What one misbehaving client did."""

    kind: str  # disconnect | slow_reader
    start: float
    end: float = 0.0
    bytes_read: int = 0
    finished: bool = False  # saw the stream's [DONE]
    error: str = ""


@dataclass
class Timeline:
    """Shared between the fault thread and the load thread: times are perf_counter()."""

    origin: float = 0.0
    faults: list[Fault] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    records: list[tuple[str, RequestRecord, float]] = field(default_factory=list)
    rude: list[Rude] = field(default_factory=list)
    load_done: threading.Event = field(default_factory=threading.Event)
    started: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def now(self) -> float:
        return time.perf_counter() - self.origin

    def fault(self, kind: str, target: str, detail: str = "", at: float | None = None) -> Fault:
        f = Fault(at=self.now() if at is None else at, kind=kind, target=target, detail=detail)
        with self.lock:
            self.faults.append(f)
        print(f"[{f.at:7.1f}s] {kind} {target} {detail}", flush=True)
        return f


# ---------------------------------------------------------------------- sampling
def sample(cluster: LocalCluster) -> dict[str, Any]:
    servers = {f"{r.pool}-{r.index}": r.pid for rs in cluster.replicas.values() for r in rs}
    parts = memory_split_by_role(pids_by_role(servers, {"gateway": cluster.gateway_pid}))
    return {"memory": resident(parts), "parts": parts, "shm": shm_bytes()}


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read().decode()


def slots(cluster: LocalCluster) -> dict[str, float]:
    """Every tier's active and waiting sequences per replica, and the gateway's in-flight
    and queued requests per pool: all must be 0 once the load has drained."""
    out: dict[str, float] = {}
    for pool, replicas in cluster.replicas.items():
        for r in replicas:
            page = scrape(r.metrics_url)
            for labels, value in samples(page, "llm_engine_sequences"):
                out[f"{pool}-{r.index}/{labels.get('model')}/{labels.get('state')}"] = value
    page = scrape(f"{cluster.gateway_url}/metrics")
    for name in ("gateway_pool_in_flight", "gateway_pool_queued"):
        for pool in cluster.replicas:
            for value in gauge(page, name, pool=pool):
                out[f"gateway/{pool}/{name}"] = value
    return out


# ---------------------------------------------------------------------- rude clients
async def disconnect_midstream(base_url: str, prompt: str, t: Timeline) -> Rude:
    """Stream a long answer, read a few events, then drop the connection."""
    rude = Rude("disconnect", t.now())
    body = {"model": TIER, "prompt": prompt, "max_tokens": 256, "stream": True}
    try:
        async with (
            httpx.AsyncClient(timeout=60) as http,
            http.stream("POST", f"{base_url}/completions", json=body) as resp,
        ):
            async for line in resp.aiter_lines():
                rude.bytes_read += len(line) + 1
                if line.startswith("data:") and rude.bytes_read > 400:
                    break  # leaving the block closes the connection mid-stream
    except httpx.HTTPError as exc:
        rude.error = f"{type(exc).__name__}: {exc}"
    rude.end = t.now()
    return rude


async def slow_reader(base_url: str, prompt: str, t: Timeline, limit_s: float) -> Rude:
    """Stream a long answer through a socket with a tiny receive buffer, 128 bytes every
    quarter second (slower than the tokens come), so the gateway's writes back up (raw HTTP/1.1: the point is a client
    that reads slower than the server writes, which no HTTP library offers)."""
    rude = Rude("slow_reader", t.now())
    host, port = base_url.split("//", 1)[1].split("/", 1)[0].split(":")
    body = json.dumps({"model": TIER, "prompt": prompt, "max_tokens": 256, "stream": True})
    request = (
        f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n{body}"
    ).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    seen = b""
    try:
        await loop.sock_connect(sock, (host, int(port)))
        await loop.sock_sendall(sock, request)
        deadline = time.perf_counter() + limit_s
        while time.perf_counter() < deadline:
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 128), timeout=limit_s)
            if not chunk:
                break
            if not rude.bytes_read and not chunk.startswith(b"HTTP/1.1 200"):
                rude.error = chunk.split(b"\r\n", 1)[0].decode(errors="replace")
            rude.bytes_read += len(chunk)
            seen = (seen + chunk)[-64:]
            if b"[DONE]" in seen:
                rude.finished = True
                break
            await asyncio.sleep(0.25)
        else:
            rude.error = f"not finished after {limit_s:g}s of slow reading"
    except (OSError, TimeoutError) as exc:
        rude.error = f"{type(exc).__name__}: {exc}"
    finally:
        sock.close()
    rude.end = t.now()
    return rude


# ---------------------------------------------------------------------- warm-up
async def peak_warmup(cluster: LocalCluster, prompt: str, tokens: int) -> dict[str, Any]:
    """Every LLM replica streams its pool's ``max_in_flight`` answers of ``tokens`` at once.

    A tritonserver's heap keeps the high-water mark of the answers it has streamed at once
    (on one server, 256-token answers: 4.8 MiB idle, 11.6 after 16 at once, then 11.9 and
    12.0 after two more such bursts; results/triton_heap_peak.md), and the load alone reaches
    that width on a replica only by chance, at any time in the run. Warmed up to the width
    the gateway allows (its ``max_in_flight`` per replica), the after-warm-up sample holds
    the peak, and later growth is growth. Sent straight to each replica over gRPC, as the
    gateway sends, with an ``end_id`` that matches no token so every answer is ``tokens``
    long. Returns the seconds it took and the responses per replica.
    """
    routing = RoutingSettings.from_file(DEFAULT_ROUTER_CONFIG)
    tokenizer = load_tokenizer(None, routing.tokenizer_dir)
    ids = tokenizer.encode_chat([{"role": "user", "content": prompt}])
    inputs = tier_inputs(ids, tokens, -1, tokenizer.pad_id)

    async def stream(client: AsyncClient, model: str) -> int:
        return len([r async for r in client.stream_tensors(model, inputs)])

    async def replica(name: str, url: str, model: str, width: int) -> tuple[str, int]:
        async with AsyncClient(url) as client:
            counts = await asyncio.gather(*(stream(client, model) for _ in range(width)))
        return name, sum(counts)

    began = time.perf_counter()
    bursts = [
        replica(f"{pool['name']}-{r.index}/{model}", r.grpc_url, model, pool["max_in_flight"])
        for pool in cluster.source["pools"]
        for r in cluster.replicas.get(pool["name"], [])
        for model in pool["models"]
        if model.startswith("llm_")
    ]
    responses = dict(await asyncio.gather(*bursts))
    return {"seconds": time.perf_counter() - began, "tokens": tokens, "responses": responses}


# ---------------------------------------------------------------------- the load thread
async def _load(cluster: LocalCluster, args: argparse.Namespace, t: Timeline) -> None:
    prompts = load_prompts(args.prompts)
    caps = [int(x) for x in args.output_tokens.split(",")]
    auto_users = args.users // 3
    groups = [(TIER, args.users - auto_users, 1), ("auto", auto_users, 2)]

    def keep(model: str) -> Any:
        def on_record(record: RequestRecord) -> None:
            now = time.perf_counter()
            # On the faults' clock: each load's own origin is a moment after t.origin,
            # which put streams cut by a kill a tenth of a second before the kill.
            record.start = now - t.origin - record.e2e
            with t.lock:
                t.records.append((model, record, now))

        return on_record

    async def sampler() -> None:
        while not t.load_done.is_set():
            s = await asyncio.to_thread(sample, cluster)
            s["t"] = t.now()
            with t.lock:
                t.samples.append(s)
            await asyncio.sleep(SAMPLE_EVERY_S)

    async def rude_clients() -> None:
        await asyncio.sleep(max(args.duration * 0.45 - t.now(), 0))
        t.fault("rude_clients", "", f"{args.disconnects} disconnect, {args.slow} slow readers")
        tasks = [
            disconnect_midstream(cluster.base_url, prompts[i], t) for i in range(args.disconnects)
        ]
        tasks += [
            slow_reader(cluster.base_url, prompts[-1 - i], t, 300.0) for i in range(args.slow)
        ]
        for rude in await asyncio.gather(*tasks):
            with t.lock:
                t.rude.append(rude)

    t.origin = time.perf_counter()
    t.started.set()
    sampling = asyncio.create_task(sampler())
    rude = asyncio.create_task(rude_clients())
    await asyncio.gather(
        *(
            openai_load(
                cluster.base_url,
                jobs(prompts, caps, seed),
                LoadShape(users=users, duration=args.duration, seed=seed),
                model=model,
                on_record=keep(model),
            )
            for model, users, seed in groups
            if users
        ),
        rude,
    )
    t.load_done.set()
    await sampling


# ---------------------------------------------------------------------- faults (main thread)
def _sleep_until(t: Timeline, at: float) -> None:
    while t.now() < at:
        time.sleep(min(0.2, at - t.now()))


def faults(cluster: LocalCluster, args: argparse.Namespace, t: Timeline) -> dict[str, Any]:
    """Kill and restart a replica, kill a stub; runs on the main thread, which started
    every Triton (their parent-death signal is tied to it)."""
    t.started.wait()
    out: dict[str, Any] = {}
    _sleep_until(t, args.duration * 0.25)
    victim = cluster.replica(POOL, 1)
    name = victim.grpc_url
    at = t.now()  # the kill's moment, before kill() waits for the process to be reaped
    t.fault("kill_replica", name, f"tritonserver pid {cluster.kill(POOL, 1)}", at=at)
    time.sleep(args.restart_after)
    t.fault("restart_replica", name, "starting")
    cluster.restart(POOL, 1)
    ready = t.now()
    t.fault("replica_ready", name, "models loaded, deep health 200")
    back = None
    while t.now() < ready + 60:
        if name in cluster.healthy(POOL):
            back = t.now() - ready
            break
        time.sleep(0.25)
    out["replica_ready_at"] = ready
    out["back_in_rotation_s"] = back
    _sleep_until(t, args.duration * 0.6)
    keeper = cluster.replica(POOL, 0)
    stub = next(s for s in find_stubs(keeper.pid or 0) if s.model == TIER)
    at = t.now()
    os.kill(stub.pid, signal.SIGKILL)
    t.fault("kill_stub", keeper.grpc_url, f"{stub.instance} pid {stub.pid}", at=at)
    return out


def cpu_topology(workdir: Path, max_wait: float) -> Path:
    """The pools topology with the admission wait sized for CPU replicas.

    The topology's ``max_wait_s`` (20-30 s) is sized for H100 replicas, whose answers take
    seconds. Here a 256-token answer takes minutes under 30 users, so while one of the two
    small replicas restarts, a request can wait longer than 20 s for a slot of the other
    and would be shed with 429 (the first short run shed 17 that way). The soak checks
    that faults lose no request, so the queue gets a wait budget of CPU scale; shedding
    itself is tested by the overload test.
    """
    source = yaml.safe_load(manifests.TOPOLOGY.read_text())
    for pool in source["pools"]:
        pool["max_wait_s"] = max_wait
    path = workdir / "topology.soak.yaml"
    path.write_text(yaml.safe_dump(source, sort_keys=False))
    return path


# ---------------------------------------------------------------------- report
def outcomes(t: Timeline) -> list[Outcome]:
    out = []
    for _model, r, _ in t.records:
        message = r.error_message or ""
        out.append(
            Outcome(
                start=r.start,
                end=r.start + r.e2e,
                ok=r.ok,
                streamed=r.ttft is not None,
                replica=r.replica or "",
                error=r.error or "",
                clean_error_event=message.startswith("stream error event"),
            )
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600.0, help="load seconds (full: 600)")
    parser.add_argument("--users", type=int, default=30)
    parser.add_argument("--output-tokens", default="16,16,16,256", help="caps drawn per request")
    parser.add_argument("--restart-after", type=float, default=15.0)
    parser.add_argument("--disconnects", type=int, default=6)
    parser.add_argument("--slow", type=int, default=3)
    parser.add_argument("--prompts", type=Path, default=DOLLY)
    parser.add_argument(
        "--max-wait", type=float, default=300.0, help="admission wait budget (see cpu_topology)"
    )
    parser.add_argument(
        "--peak-tokens",
        type=int,
        default=None,
        help="answer length of the warm-up burst (default: the largest cap; 0: no burst)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.peak_tokens is None:
        args.peak_tokens = max(int(x) for x in args.output_tokens.split(","))

    t = Timeline()
    workdir = Path(tempfile.mkdtemp(prefix="soak-"))
    cluster = LocalCluster(
        topology=cpu_topology(workdir, args.max_wait),
        workdir=workdir,
        progress=lambda m: print(m, flush=True),
    )
    with cluster:
        print(cluster.describe(), flush=True)
        warmup: dict[str, Any] = {}
        if args.peak_tokens:
            print(f"warm-up: the widest burst of {args.peak_tokens}-token answers ...", flush=True)
            prompt = load_prompts(args.prompts)[0]
            warmup = asyncio.run(peak_warmup(cluster, prompt, args.peak_tokens))
            warmup["sample"] = sample(cluster)
            print(f"warm-up done in {warmup['seconds']:.0f} s: {warmup['responses']}", flush=True)
        loader = threading.Thread(target=lambda: asyncio.run(_load(cluster, args, t)), daemon=True)
        loader.start()
        fault_report = faults(cluster, args, t)
        loader.join()
        load_end = t.now()
        drained = _drain(cluster, t)
        end_sample = sample(cluster)
        end_slots = slots(cluster)
    report = _report(args, t, fault_report, load_end, drained, end_sample, end_slots)
    report["peak_warmup"] = warmup
    _write(args.out, report, t)
    print(Path(args.out / "soak.md").read_text())
    return 0 if report["judgement_met"] else 1


def _drain(cluster: LocalCluster, t: Timeline, limit: float = 120.0) -> float | None:
    """Seconds after the load stopped until every slot gauge reads 0 (None: never)."""
    began = time.perf_counter()
    while time.perf_counter() - began < limit:
        if not any(slots(cluster).values()):
            return time.perf_counter() - began
        time.sleep(1.0)
    return None


def _sample_at(t: Timeline, at: float) -> dict[str, Any]:
    """The last sample taken at or before ``at`` (the first fault: after warm-up)."""
    before = [s for s in t.samples if s["t"] <= at]
    return before[-1] if before else t.samples[0]


def _report(
    args: argparse.Namespace,
    t: Timeline,
    fault_report: dict[str, Any],
    load_end: float,
    drained: float | None,
    end_sample: dict[str, Any],
    end_slots: dict[str, float],
) -> dict[str, Any]:
    first_fault = min(f.at for f in t.faults)
    warm = _sample_at(t, first_fault)
    # Memory is compared under the same load: the last sample before the load stopped
    # (after the drain the engines hold no KV cache, which is not where they were).
    loaded_end = _sample_at(t, load_end)
    outs = outcomes(t)
    verdict: Judgement = judge(
        outs,
        t.faults,
        back_in_rotation_s=fault_report["back_in_rotation_s"],
        memory_after_warmup=warm["memory"],
        memory_at_end=loaded_end["memory"],
        shm_after_warmup=warm["shm"],
        shm_at_end=end_sample["shm"],
        slots_at_end=end_slots,
        parts_after_warmup=warm.get("parts"),
        parts_at_end=loaded_end.get("parts"),
    )
    records = [r for _, r, _ in t.records]
    return {
        "config": {**{k: str(v) for k, v in vars(args).items()}, "cpu": cpu_name()},
        "faults": [asdict(f) for f in t.faults],
        "fault_report": fault_report,
        "load_end_s": load_end,
        "drained_after_s": drained,
        "warm_sample": warm,
        "loaded_end_sample": loaded_end,
        "drained_sample": end_sample,
        "drained_memory_drift": memory_drift(warm["memory"], end_sample["memory"]),
        "end_slots": end_slots,
        "rude_clients": [asdict(r) for r in t.rude],
        "summary": summarize(records, load_end),
        "by_model": {
            m: summarize([r for mm, r, _ in t.records if mm == m], load_end)
            for m in sorted({m for m, _, _ in t.records})
        },
        "judgement": verdict.to_json(),
        "judgement_met": verdict.met,
        "samples": t.samples,
        "requests": [{**r.to_json(), "group": m} for m, r, _ in t.records],
    }


def _write(out: Path, report: dict[str, Any], t: Timeline) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(report, indent=1) + "\n")
    plots = out / "soak"
    marks = [(f.at, f.kind) for f in t.faults]
    records = [r for _, r, _ in t.records]
    write_plots(plots, records, "soak through the gateway", marks=marks)
    _plot_errors_and_memory(plots, report, marks)
    (out / "soak.md").write_text(markdown(report))


def _plot_errors_and_memory(
    directory: Path, report: dict[str, Any], marks: list[tuple[float, str]]
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    reqs = report["requests"]
    end = max((r["start"] + r["e2e"] for r in reqs), default=1.0)
    edges = list(range(0, int(end) + 11, 10))
    ok = [r["start"] + r["e2e"] for r in reqs if r["error"] is None]
    bad = [r["start"] + r["e2e"] for r in reqs if r["error"] is not None]
    ax.hist(
        [ok, bad], bins=edges, stacked=True, label=["ok", "failed"], color=["tab:green", "tab:red"]
    )
    mark_events(ax, marks)
    ax.set_xlabel("request end (s since the load began)")
    ax.set_ylabel("requests per 10 s")
    ax.set_title("Outcomes over time, faults marked")
    ax.legend()
    fig.tight_layout()
    fig.savefig(directory / "outcomes_over_time.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    roles = sorted({k for s in report["samples"] for k in s["memory"]})
    for role in roles:
        pts = [
            (s["t"], s["memory"][role] / 2**20) for s in report["samples"] if role in s["memory"]
        ]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=role, lw=1)
    ax.plot(
        [s["t"] for s in report["samples"]],
        [s["shm"] / 2**20 for s in report["samples"]],
        "k--",
        label="/dev/shm",
    )
    mark_events(ax, marks)
    ax.set_xlabel("s since the load began")
    ax.set_ylabel("resident MiB")
    ax.set_title("Memory of every process, faults marked")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(directory / "memory_over_time.png", dpi=110)
    plt.close(fig)


def markdown(report: dict[str, Any]) -> str:
    c = report["config"]
    s = report["summary"]
    lines = [
        "# Soak with faults through the gateway (issue 13, item 4)",
        "",
        f"Command: `python benchmarks/soak.py --duration {float(c['duration']):g}`  ",
        f"CPU: {c['cpu']}",
        "",
        f"`make cluster`'s pools topology (a Triton per pool replica, two replicas of "
        f"`{TIER}`, the gateway in front). {c['users']} users, closed loop, "
        f"{float(c['duration']):g} s; two thirds name `{TIER}`, one third send `auto`; Dolly "
        f"prompts, output caps drawn from [{c['output_tokens']}].",
        "",
        "## Goals",
        "",
        "| goal | met | measured |",
        "|---|---|---|",
    ]
    for v in report["judgement"]:
        lines.append(f"| {v['goal']} | {'yes' if v['met'] else '**no**'} | {v['detail']} |")
    drift = report["drained_memory_drift"]
    if drift:
        worst = max(drift.items(), key=lambda kv: abs(kv[1]))
        lines += [
            "",
            f"After the drain (no load, no KV cache held) memory differs from the warm-up "
            f"sample by at most {worst[1]:+.1%} ({worst[0]}); every slot was free "
            + (
                "never"
                if report["drained_after_s"] is None
                else f"{report['drained_after_s']:.1f} s"
            )
            + " after the load stopped.",
        ]
    lines += _memory_lines(report)
    lines += ["", "## Faults", "", "| at (s) | fault | target | detail |", "|---|---|---|---|"]
    for f in report["faults"]:
        lines.append(f"| {f['at']:.1f} | {f['kind']} | {f['target']} | {f['detail']} |")
    lines += ["", "## Requests", ""]
    ttft, itl = s["ttft_ms"], s["inter_token_latency_ms"]
    lines.append(
        f"{s['requests']} requests, errors: "
        + (", ".join(f"{k} {v}" for k, v in s["errors"].items()) or "none")
        + f". TTFT p50/p90/p99 {ttft['p50']:.0f}/{ttft['p90']:.0f}/{ttft['p99']:.0f} ms, "
        f"ITL p50/p99 {itl['p50']:.0f}/{itl['p99']:.0f} ms."
    )
    lines += ["", "Misbehaving clients:", ""]
    for r in report["rude_clients"]:
        state = "finished" if r["finished"] else (r["error"] or "closed by us")
        lines.append(f"- {r['kind']} at {r['start']:.0f} s: {r['bytes_read']} bytes read, {state}")
    lines += [
        "",
        "Plots: `soak/ttft_over_time.png`, `soak/outcomes_over_time.png`, "
        "`soak/memory_over_time.png`, `soak/latency_cdf.png`.",
        "",
        "Prompts: Databricks Dolly 15k sample (CC BY-SA 3.0).",
        "",
    ]
    return "\n".join(lines)


def _memory_lines(report: dict[str, Any]) -> list[str]:
    """Each process's resident memory (and a tritonserver's heap) at the three moments."""
    peak = report.get("peak_warmup") or {}
    moments = [("warm-up burst", peak.get("sample"))] if peak else []
    moments += [
        ("first fault (baseline)", report["warm_sample"]),
        ("load end", report["loaded_end_sample"]),
    ]
    moments = [(name, s) for name, s in moments if s]
    lines = ["", "## Memory", ""]
    if peak:
        lines += [
            f"Before the load, every LLM replica streamed its pool's `max_in_flight` answers "
            f"of {peak['tokens']} tokens at once ({sum(peak['responses'].values())} responses "
            f"in {peak['seconds']:.0f} s), so the baseline holds the heap's high-water mark "
            "(see `peak_warmup` in soak.py).",
            "",
        ]
    lines += [
        "The baseline is the last sample before the first fault. MiB; a tritonserver's own "
        "heap (`RssAnon`) in brackets.",
        "",
    ]
    lines += [
        "| process | " + " | ".join(name for name, _ in moments) + " | change |",
        "|---|" + "---|" * (len(moments) + 1),
    ]
    base, end = report["warm_sample"]["memory"], report["loaded_end_sample"]["memory"]

    def cell(s: dict[str, Any], role: str) -> str:
        if role not in s["memory"]:
            return "-"
        text = f"{s['memory'][role] / 2**20:.1f}"
        anon = (s.get("parts") or {}).get(role, {}).get("anon")
        return f"{text} ({anon / 2**20:.1f})" if anon and role.endswith("tritonserver") else text

    for role in base:
        change = f"{(end[role] - base[role]) / base[role]:+.1%}" if role in end else "-"
        lines.append(
            f"| {role} | " + " | ".join(cell(s, role) for _, s in moments) + f" | {change} |"
        )
    return lines


if __name__ == "__main__":
    sys.exit(main())
