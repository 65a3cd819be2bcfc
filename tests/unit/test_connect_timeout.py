"""A replica that never accepts the connection is unavailable after the connect timeout.

The gateway's first-token and idle-stream timeouts bound a replica that accepted the
request; this is the third deadline, for one that does not accept the connection (a
dead node, a blackholed address). It must fail as ServerUnavailable, which the replica
pool retries elsewhere and ejects for, and not as a client Timeout, which it would not.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import aiohttp
import numpy as np
import pytest

from client.errors import ServerUnavailable, Timeout, translate
from client.transport import HttpTransport


@pytest.fixture
def blackhole() -> Iterator[str]:
    """A local address whose accept queue is full, so the kernel drops new SYNs."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    address = server.getsockname()
    fillers = []
    try:
        for _ in range(8):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(address)
            fillers.append(filler)
        probe = socket.socket()
        probe.settimeout(0.3)
        with pytest.raises(TimeoutError):  # the precondition: a connect here hangs
            probe.connect(address)
        probe.close()
        yield f"{address[0]}:{address[1]}"
    finally:
        for filler in fillers:
            filler.close()
        server.close()


def test_stream_to_a_replica_that_never_accepts_is_unavailable(blackhole: str) -> None:
    async def run() -> None:
        transport = HttpTransport(blackhole)
        transport.connect_timeout = 0.3
        try:
            stream = transport.stream("router", {"text_input": np.array([b"hi"], dtype=object)})
            with pytest.raises(ServerUnavailable, match="cannot connect"):
                await asyncio.wait_for(anext(stream), 30)  # far above the connect timeout
        finally:
            await transport.close()

    asyncio.run(run())


def test_connect_timeout_is_unavailable_but_a_read_timeout_is_a_timeout() -> None:
    assert isinstance(translate(aiohttp.ConnectionTimeoutError("connect")), ServerUnavailable)
    assert isinstance(translate(aiohttp.SocketTimeoutError("read")), Timeout)
    assert isinstance(translate(TimeoutError()), Timeout)
