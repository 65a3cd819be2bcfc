"""The tritonserver memory probe's arithmetic and parsing, without a server."""

from __future__ import annotations

import argparse
import os

import pytest

from benchmarks.soak_probe import FIELDS, status_kib
from benchmarks.triton_memory import _variant, heap_summary, slope_kib_per_request


def test_slope_is_kib_per_request_by_least_squares() -> None:
    assert slope_kib_per_request([(0, 100), (100, 150), (200, 200)]) == pytest.approx(0.5)
    assert slope_kib_per_request([(0, 100), (100, 100), (200, 100)]) == pytest.approx(0.0)
    assert slope_kib_per_request([(0, 100)]) != slope_kib_per_request([(0, 100)])  # nan


def test_heap_summary_slopes_over_both_halves_share_the_middle_point() -> None:
    heap = [100, 300, 400, 400, 400]
    samples = [{"cycle": i, "RssAnon": kib, "VmRSS": kib + 1000} for i, kib in enumerate(heap)]
    summary = heap_summary(samples, "cycle", "cycle")
    assert summary == {
        "anon_start_kib": 100,
        "anon_end_kib": 400,
        "rss_start_kib": 1100,
        "rss_end_kib": 1400,
        "anon_kib_per_cycle": pytest.approx(70.0),
        "anon_kib_per_cycle_first_half": pytest.approx(150.0),  # samples 0-2
        "anon_kib_per_cycle_second_half": pytest.approx(0.0),  # samples 2-4
    }


def test_status_reads_the_resident_split_of_a_process() -> None:
    kib = status_kib(os.getpid())
    assert set(kib) == set(FIELDS)
    assert kib["VmRSS"] == kib["RssAnon"] + kib["RssFile"] + kib["RssShmem"]


def test_variants_parse_and_bad_ones_are_clear() -> None:
    assert _variant("grpc:4") == ("grpc", 4)
    with pytest.raises(argparse.ArgumentTypeError, match="want grpc:N or http:N"):
        _variant("udp:4")


def test_fault_costs_are_read_above_the_plateau_each_after_its_own_bursts() -> None:
    from benchmarks.triton_heap_peak import FAULTS, costs

    heap = {"idle, before any request": 4000, "plateau, burst 1": 11000, "plateau, burst 2": 11200}
    running = 11200
    for i, (name, _event, _streaming) in enumerate(FAULTS):
        heap[name] = running + 50  # read at the fault: not its cost yet
        running += 100 * (i + 1)
        heap[f"after {name}, burst 1"] = running - 10
        heap[f"after {name}, burst 2"] = running
    steps = [{"step": step, "RssAnon": kib} for step, kib in heap.items()]
    assert costs(steps) == {
        "plateau": 200,
        **{name: 100 * (i + 1) for i, (name, _e, _s) in enumerate(FAULTS)},
    }
