"""The OpenAI-compatible frontend scheduler in front of the Triton replicas.

``python -m gateway`` serves ``/v1/chat/completions``, ``/v1/completions``,
``/v1/embeddings`` and ``/v1/models`` over one Triton server (single placement, what
``make serve`` starts) or over pools of servers described by a topology file (pools
placement). It routes ``model: "auto"`` with the router's own policy, balances each pool
with the client's replica pool, admits or sheds load per pool, checks API keys and
exports Prometheus metrics. See docs/gateway.md.

Nothing here imports torch, transformers or the server's packages: the gateway runs
from ``pip install ".[gateway]"``.
"""
