"""Raw-socket helpers for tests of what a server does with a client that misbehaves."""

from __future__ import annotations

import socket


def send_and_read(host: str, port: int, data: bytes, wait: float) -> bytes | None:
    """Send ``data`` and then nothing; every byte back until the server closes, or None
    if it had answered nothing after ``wait`` seconds of silence."""
    with socket.create_connection((host, port)) as sock:
        sock.settimeout(wait)
        sock.sendall(data)
        got = b""
        try:
            while chunk := sock.recv(65536):
                got += chunk
        except TimeoutError:
            return got or None
        except ConnectionResetError:
            pass  # closed with our unread bytes in its buffer: what it answered came first
        return got
