"""Client SDK, CLI and load generator for the Triton LLM stack.

Quick start::

    from client import Client

    with Client("127.0.0.1:8001") as c:
        for chunk in c.chat("Summarize: ...", stream=True):
            print(chunk.text, end="")
"""

from client.balancing import AsyncReplicaPool, Strategy
from client.errors import (
    Cancelled,
    ClientError,
    InvalidInput,
    ModelNotFound,
    ServerError,
    ServerUnavailable,
    Timeout,
)
from client.sdk import AsyncClient, Chunk, Classification, Client, Generation
from client.transport import ModelStatus, Protocol

__all__ = [
    "AsyncClient",
    "AsyncReplicaPool",
    "Cancelled",
    "Chunk",
    "Classification",
    "Client",
    "ClientError",
    "Generation",
    "InvalidInput",
    "ModelNotFound",
    "ModelStatus",
    "Protocol",
    "ServerError",
    "ServerUnavailable",
    "Strategy",
    "Timeout",
]
