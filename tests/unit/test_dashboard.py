"""Every metric the Grafana dashboard queries is one the stack exports.

Exported names come from where they are defined: the gateway's registry (with the
suffixes prometheus_client adds: ``_total`` for counters, ``_bucket``/``_sum``/``_count``
for histograms), the router's custom metrics (LabelledMetric in serving/), and Triton's
own ``nv_*`` metrics, looked up in the tritonserver library this project runs.
"""

from __future__ import annotations

import json
import re
import sysconfig
from pathlib import Path

from gateway.metrics import GatewayMetrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "docker" / "k8s" / "base" / "dashboard.json"

#: What a PromQL expression contains besides metric names.
PROMQL_WORDS = {
    "sum", "avg", "min", "max", "count", "rate", "irate", "increase", "histogram_quantile",
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
    "topk", "bottomk", "clamp_min", "clamp_max", "abs", "le",
}  # fmt: skip
#: Triton metrics its library does not hold as one literal string (the names are assembled),
#: listed in Triton's docs/user_guide/metrics.md; the first is read from a real server by
#: tests/integration/test_router.py and test_cluster.py.
TRITON_ASSEMBLED = {"nv_inference_request_success", "nv_gpu_memory_used_bytes"}
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def queried_metrics() -> set[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    names = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = re.sub(r'"[^"]*"', "", target["expr"])  # label values
            expr = re.sub(r"\b(by|without)\s*\([^)]*\)", "", expr)  # grouping labels
            expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", expr)  # matchers, ranges
            for word in re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
                if word not in PROMQL_WORDS:
                    names.add(word)
    return names


def gateway_exports() -> set[str]:
    metrics = GatewayMetrics()
    metrics.watch_pools(lambda: [])
    names = set()
    for family in metrics.registry.collect():
        names |= {family.name + s for s in SUFFIXES.get(family.type, ("",))}
    return names


def router_exports() -> set[str]:
    names = set()
    for path in (ROOT / "serving").rglob("*.py"):
        names |= set(re.findall(r'LabelledMetric\(\s*"(\w+)"', path.read_text()))
    return names


def triton_library() -> bytes:
    libs = Path(sysconfig.get_paths()["purelib"]) / "nvidia_pytriton.libs"
    (lib,) = libs.glob("libtritonserver*.so*")
    return lib.read_bytes()


def test_the_dashboard_covers_what_the_issue_asks_for() -> None:
    titles = " ".join(p["title"] for p in json.loads(DASHBOARD.read_text())["panels"])
    for topic in ("TTFT", "Inter-token", "tokens/s", "Queue", "Replicas", "Routing", "Cost"):
        assert topic in titles


def test_every_queried_metric_is_exported() -> None:
    queried = queried_metrics()
    assert "gateway_ttft_seconds_bucket" in queried and "nv_gpu_utilization" in queried
    ours = gateway_exports() | router_exports()
    library = triton_library()
    missing = sorted(
        name
        for name in queried
        if name not in ours | TRITON_ASSEMBLED
        and not (name.startswith("nv_") and name.encode() in library)
    )
    assert not missing, f"the dashboard queries metrics nothing exports: {missing}"


def test_the_check_would_catch_a_misspelt_metric() -> None:
    assert "gateway_ttft_seconds" + "_bucket" in gateway_exports()
    assert "gateway_ttft_bucket" not in gateway_exports()
    assert b"nv_inference_pending_request_count" in triton_library()
    assert b"nv_inference_pending_requests_count" not in triton_library()
