"""GPU topology from ``nvidia-smi``: which GPUs there are, and which talk over NVLink.

Input is the text people already have: ``nvidia-smi topo -m`` followed by
``nvidia-smi --query-gpu=index,name,memory.total --format=csv`` (one file holding both, as
``{ nvidia-smi topo -m; nvidia-smi --query-gpu=index,name,memory.total --format=csv; }``
writes it), or the live commands on a GPU node. Parsing a recording keeps the planner
testable on machines without GPUs.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from serving.errors import ConfigError

QUERY_COMMAND = ["nvidia-smi", "--query-gpu=index,name,memory.total", "--format=csv"]
TOPO_COMMAND = ["nvidia-smi", "topo", "-m"]

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_GPU_LABEL = re.compile(r"^GPU(\d+)$")
_NVLINK = re.compile(r"^NV(\d+)$")
_QUERY_ROW = re.compile(r"^\s*(?:(\d+)\s*,\s*)?([^,]*[A-Za-z][^,]*?)\s*,\s*(\d+)\s*(?:MiB)?\s*$")

# Peak HBM/GDDR bandwidth, GB/s, from NVIDIA's data sheets: the roofline's denominator.
MEMORY_BANDWIDTH_GBS = {
    "H100 NVL": 3900.0,
    "H100 PCIe": 2000.0,
    "H100 80GB HBM3": 3350.0,
    "H100 SXM": 3350.0,
    "H200": 4800.0,
    "A100-SXM4-80GB": 2039.0,
    "A100 80GB PCIe": 1935.0,
    "L40S": 864.0,
}


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    memory_mib: int

    @property
    def memory_gib(self) -> float:
        return self.memory_mib / 1024

    @property
    def bandwidth_gbs(self) -> float | None:
        """Peak memory bandwidth if the model is known (longest matching name wins)."""
        hits = [k for k in MEMORY_BANDWIDTH_GBS if k in self.name]
        return MEMORY_BANDWIDTH_GBS[max(hits, key=len)] if hits else None


@dataclass
class Topology:
    """GPUs plus the pairwise link matrix (``"NV12"``, ``"SYS"``, ``"PHB"``, ...)."""

    gpus: list[Gpu]
    links: dict[tuple[int, int], str] = field(default_factory=dict)
    source: str = ""

    def nvlinks(self, a: int, b: int) -> int:
        """Bonded NVLink count between two GPUs (0 when they only share PCIe)."""
        match = _NVLINK.match(self.links.get((a, b), ""))
        return int(match.group(1)) if match else 0

    def nvlink_groups(self) -> list[list[int]]:
        """GPUs joined by NVLink (connected components); a GPU without NVLink is alone."""
        seen: set[int] = set()
        groups = []
        for gpu in self.gpus:
            if gpu.index in seen:
                continue
            stack, group = [gpu.index], []
            seen.add(gpu.index)
            while stack:
                cur = stack.pop()
                group.append(cur)
                for other in self.gpus:
                    if other.index not in seen and self.nvlinks(cur, other.index):
                        seen.add(other.index)
                        stack.append(other.index)
            groups.append(sorted(group))
        return sorted(groups)

    def gpu(self, index: int) -> Gpu:
        return next(g for g in self.gpus if g.index == index)


def parse_topology(text: str, source: str = "") -> Topology:
    """Parse ``topo -m`` output plus the ``--query-gpu`` CSV (in the same text)."""
    text = _ANSI.sub("", text)
    lines = text.splitlines()
    header = next((ln for ln in lines if _header_gpus(ln)), None)
    if header is None:
        raise ConfigError(
            f"{source or 'topology'}: no 'nvidia-smi topo -m' matrix found "
            f"(expected a header line starting with GPU0)"
        )
    columns = _header_gpus(header)
    links: dict[tuple[int, int], str] = {}
    rows = 0
    for line in lines:
        tokens = line.split()
        if (
            line is header
            or not tokens
            or not _GPU_LABEL.match(tokens[0])
            or len(tokens) < len(columns) + 1
        ):
            continue
        row = int(_GPU_LABEL.match(tokens[0]).group(1))
        rows += 1
        for col, value in zip(columns, tokens[1:], strict=False):
            links[(row, col)] = value
    if rows != len(columns):
        raise ConfigError(
            f"{source or 'topology'}: the matrix has {len(columns)} GPU columns "
            f"but {rows} GPU rows; is the recording cut off?"
        )
    gpus = _parse_query(lines)
    if not gpus:
        raise ConfigError(
            f"{source or 'topology'}: no GPU names and memory sizes found; append the output "
            f"of '{' '.join(QUERY_COMMAND)}' to the file"
        )
    if sorted(g.index for g in gpus) != sorted(columns):
        raise ConfigError(
            f"{source or 'topology'}: --query-gpu lists GPUs "
            f"{sorted(g.index for g in gpus)} but the matrix has {sorted(columns)}"
        )
    return Topology(sorted(gpus, key=lambda g: g.index), links, source)


def _header_gpus(line: str) -> list[int]:
    tokens = line.split()
    if not tokens or tokens[0] != "GPU0":
        return []
    labels = [_GPU_LABEL.match(t) for t in tokens]
    return [int(m.group(1)) for m in labels if m]


def _parse_query(lines: list[str]) -> list[Gpu]:
    gpus = []
    for line in lines:
        match = _QUERY_ROW.match(line)
        if not match or "memory.total" in line:
            continue
        index = int(match.group(1)) if match.group(1) is not None else len(gpus)
        gpus.append(Gpu(index, match.group(2).strip(), int(match.group(3))))
    return gpus


def load_topology(path: Path | None) -> Topology:
    """Read a recorded topology file, or ask the live ``nvidia-smi`` when ``path`` is None."""
    if path is not None:
        try:
            return parse_topology(Path(path).read_text(), str(path))
        except OSError as exc:
            raise ConfigError(f"cannot read topology file {path}: {exc.strerror}") from None
    if shutil.which("nvidia-smi") is None:
        raise ConfigError(
            "nvidia-smi not found: pass --topology FILE with a recorded "
            "'nvidia-smi topo -m' + '--query-gpu' output"
        )
    outputs = []
    for command in (TOPO_COMMAND, QUERY_COMMAND):
        done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
        if done.returncode:
            raise ConfigError(f"'{' '.join(command)}' failed: {done.stderr.strip()}")
        outputs.append(done.stdout)
    return parse_topology("\n".join(outputs), "nvidia-smi (live)")
