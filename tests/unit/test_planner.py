"""Topology parsing and the GPU planner, on recorded nvidia-smi outputs."""

from __future__ import annotations

from pathlib import Path

import pytest

from build_engines.__main__ import main
from build_engines.architectures import architecture
from build_engines.planner import PlanOptions, Target, plan
from build_engines.spec import tier_specs
from build_engines.topology import load_topology, parse_topology
from serving.errors import ConfigError

TOPOLOGIES = Path(__file__).resolve().parents[1] / "fixtures" / "topologies"
BRIDGED = TOPOLOGIES / "4x-h100-pcie-nvlink-bridge.txt"
NVL = TOPOLOGIES / "4x-h100-nvl.txt"
SXM = TOPOLOGIES / "8x-h100-sxm.txt"
MIXED = TOPOLOGIES / "mixed-pcie.txt"


def dense_32b(concurrency: int = 32, context: int = 4096) -> Target:
    return Target("dense-32b", architecture("dense-32b"), 2.0, 2.0, concurrency, context, "bf16")


@pytest.mark.parametrize(
    ("path", "groups", "name", "memory_mib"),
    [
        (BRIDGED, [[0, 1], [2, 3]], "NVIDIA H100 PCIe", 81559),
        (NVL, [[0, 1], [2, 3]], "NVIDIA H100 NVL", 95830),
        (SXM, [list(range(8))], "NVIDIA H100 80GB HBM3", 81559),
        (MIXED, [[0], [1], [2], [3]], "NVIDIA H100 PCIe", 81559),
    ],
)
def test_parse_recorded_topologies(
    path: Path, groups: list[list[int]], name: str, memory_mib: int
) -> None:
    topo = load_topology(path)
    assert topo.nvlink_groups() == groups
    assert topo.gpus[0].name == name
    assert topo.gpus[0].memory_mib == memory_mib


def test_link_details_and_mixed_names() -> None:
    topo = load_topology(BRIDGED)
    assert topo.nvlinks(0, 1) == 12
    assert topo.nvlinks(1, 2) == 0
    assert topo.links[(1, 2)] == "SYS"
    mixed = load_topology(MIXED)
    assert [g.name for g in mixed.gpus][2:] == ["NVIDIA L40S", "NVIDIA L40S"]
    assert mixed.gpu(2).bandwidth_gbs == 864.0
    assert load_topology(SXM).gpu(0).bandwidth_gbs == 3350.0


def test_ansi_colour_and_noheader_query_are_accepted() -> None:
    text = BRIDGED.read_text().split("index, name")[0]
    text = text.replace("GPU0\tGPU1", "\x1b[4mGPU0\tGPU1", 1) + "\x1b[0m\n"
    text += "".join("NVIDIA H100 PCIe, 81559\n" for _ in range(4))
    topo = parse_topology(text, "colour")
    assert [g.index for g in topo.gpus] == [0, 1, 2, 3]
    assert topo.nvlink_groups() == [[0, 1], [2, 3]]


def test_topology_errors_are_actionable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no 'nvidia-smi topo -m' matrix"):
        parse_topology("hello\n")
    matrix_only = BRIDGED.read_text().split("index, name")[0]
    with pytest.raises(ConfigError, match="append the output of 'nvidia-smi --query-gpu"):
        parse_topology(matrix_only)
    cut = "\n".join(BRIDGED.read_text().splitlines()[:3])
    with pytest.raises(ConfigError, match="4 GPU columns but 2 GPU rows"):
        parse_topology(cut)
    with pytest.raises(ConfigError, match="cannot read topology file"):
        load_topology(tmp_path / "nope.txt")


def test_seed_case_two_tp2_replicas_on_the_nvlink_pairs() -> None:
    """32B bf16 on four bridged H100 PCIe: 2x TP2 on 0-1 and 2-3, not 1x TP4."""
    result = plan(load_topology(BRIDGED), [dense_32b()])
    tplan = result.for_target("dense-32b")
    assert tplan.tp == 2
    assert [r.gpus for r in tplan.replicas] == [[0, 1], [2, 3]]
    assert all(r.nvlink for r in tplan.replicas)
    assert tplan.gpu_device_ids == "0,1;2,3"
    reasons = "\n".join(tplan.reasons)
    assert "TP2 is the smallest that fits" in reasons
    assert "TP1 needs 96.1 GiB per GPU" in reasons
    assert "not 1x TP4" in reasons
    assert result.used_gpus == [0, 1, 2, 3]


def test_small_model_gets_replicas_not_tp() -> None:
    small = Target("llama8b", architecture("llama-3.1-8b"), 2.0, 2.0, 16, 4096, "bf16")
    tplan = plan(load_topology(SXM), [small]).for_target("llama8b")
    assert tplan.tp == 1
    assert len(tplan.replicas) == 8
    assert tplan.gpu_device_ids == "0;1;2;3;4;5;6;7"


def test_more_context_needs_more_tp() -> None:
    """KV cache counts: 128 sequences of 8k tokens no longer fit at TP2 on 80 GB."""
    tplan = plan(load_topology(SXM), [dense_32b(128, 8192)]).for_target("dense-32b")
    assert tplan.tp == 8
    assert "TP2 needs" in "\n".join(tplan.reasons)


def test_tiers_share_the_sxm_node_without_sharing_gpus() -> None:
    result = plan(load_topology(SXM), [Target.from_spec(s) for s in tier_specs()])
    ids = {t.target.name: t.gpu_device_ids for t in result.targets}
    assert ids == {"llm_large": "0,1,2,3", "llm_medium": "4,5", "llm_small": "6;7"}
    assert result.idle == []
    assert result.aux_gpu in {4, 5, 6, 7}
    assert any("embedding, intent_encoder + intent_head" in n for n in result.notes)
    usage = result.gpu_usage()
    assert [name for name, _ in usage[0]] == ["llm_large replica 1"]
    assert [name for name, _ in usage[7]] == ["llm_small replica 2"]
    assert ("embedding + intent_encoder", 2.0) in usage[result.aux_gpu]
    assert all(sum(gib for _, gib in items) <= 80 * 0.9 for items in usage.values())


def test_tp_across_pcie_is_flagged_on_the_mixed_box() -> None:
    specs = {s.tier: s for s in tier_specs()}
    result = plan(load_topology(MIXED), [Target.from_spec(specs["llm_medium"])])
    tplan = result.for_target("llm_medium")
    assert tplan.gpu_device_ids == "0,1"  # only the H100s hold 46.5 GiB per GPU
    assert not tplan.replicas[0].nvlink
    assert any("spans GPUs without NVLink" in r for r in tplan.reasons)
    assert result.aux_gpu == 2
    assert result.idle == [3]


def test_too_big_is_not_placed_with_advice() -> None:
    specs = {s.tier: s for s in tier_specs()}
    result = plan(load_topology(MIXED), [Target.from_spec(specs["llm_large"])])
    tplan = result.for_target("llm_large")
    assert tplan.replicas == []
    assert tplan.reasons[0].startswith("NOT PLACED")
    assert "quantize, or add GPUs" in tplan.reasons[0]
    assert "only GPUs [0, 1] can hold it" in tplan.reasons[0]


def test_a_tier_squeezed_out_by_larger_ones_says_so() -> None:
    result = plan(load_topology(MIXED), [Target.from_spec(s) for s in tier_specs()])
    assert result.for_target("llm_medium").gpu_device_ids == "0,1"
    small = result.for_target("llm_small")
    assert small.replicas == []
    assert "GPUs [0, 1] are taken by larger models" in small.reasons[0]


def test_roofline_and_cost_estimates() -> None:
    options = PlanOptions(gpu_hour_price=2.0)
    tplan = plan(load_topology(BRIDGED), [dense_32b()], options).for_target("dense-32b")
    est = tplan.estimate
    assert est is not None
    # One stream: 2 x 2 TB/s over ~65.6 GB weights + 1 sequence of KV: about 60 tokens/s.
    assert 55 < est.single_stream_tok_s < 62
    assert est.batch_tok_s > 10 * est.single_stream_tok_s
    expected = 2.0 * 2 / (est.batch_tok_s * 3600) * 1e6
    assert est.cost_per_million == pytest.approx(expected)


def test_cli_plan_seed_case_prints_layout_reasons_and_snippets(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(
        [
            "plan",
            "--topology",
            str(BRIDGED),
            "--model",
            "dense-32b",
            "--dtype",
            "bfloat16",
            "--gpu-hour-price",
            "2.5",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "dense-32b: 2x TP2 on GPU0+GPU1, GPU2+GPU3" in out
    assert 'parameters { key: "gpu_device_ids" value: { string_value: "0,1;2,3" } }' in out
    assert 'device_ids: ["0", "1", "2", "3"]' in out
    assert "nvidia.com/gpu: 4" in out
    assert "ESTIMATE" in out and "per million output tokens" in out


def test_cli_plan_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--topology", str(SXM), "--json"]) == 0
    out = capsys.readouterr().out
    assert '"gpu_device_ids": "6;7"' in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["plan", "--topology", "/nonexistent/topo.txt"], "cannot read topology file"),
        (
            ["plan", "--topology", str(BRIDGED), "--model", "dense-32b", "--concurrency", "0"],
            "--concurrency must be > 0",
        ),
        (["plan", "--topology", str(BRIDGED), "--headroom", "1.5"], "--headroom is a fraction"),
    ],
)
def test_cli_errors_are_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_max_replicas_leaves_gpus_idle(capsys: pytest.CaptureFixture[str]) -> None:
    small = Target("llama8b", architecture("llama-3.1-8b"), 2.0, 2.0, 16, 4096, "bf16")
    result = plan(load_topology(SXM), [small], PlanOptions(max_replicas=3))
    assert result.for_target("llama8b").gpu_device_ids == "0;1;2"
    assert result.aux_gpu == 3
    assert result.idle == [4, 5, 6, 7]
    assert (
        main(["plan", "--topology", str(SXM), "--model", "llama-3.1-8b", "--max-replicas", "2"])
        == 0
    )
    assert "llama-3.1-8b: 2x TP1 on GPU0, GPU1" in capsys.readouterr().out
