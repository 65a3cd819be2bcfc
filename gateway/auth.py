"""API keys (``Authorization: Bearer``) checked against a file of hashed keys, and limits.

The key file holds sha256 digests, never keys, so it can sit in a ConfigMap::

    keys:
      - name: team-a
        sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
        requests_per_minute: 600
        tokens_per_minute: 200000

``python -m gateway --hash-key`` prints the digest of a key read from stdin.

Limits are token buckets refilled continuously (a full minute's allowance at most).
Tokens are charged after a request, when its usage is known; a key in debt waits until
the bucket is positive again, and the 429 says how long.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.config import read_yaml
from gateway.errors import APIError
from serving.errors import ConfigError


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class Bucket:
    """``per_minute`` units a minute, refilled continuously; may go into debt."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self._clock = clock
        self.level = float(per_minute)
        self._at = clock()

    def _refill(self) -> None:
        now = self._clock()
        self.level = min(
            float(self.per_minute), self.level + (now - self._at) * self.per_minute / 60
        )
        self._at = now

    def wait_for(self, units: float) -> float:
        """Seconds until ``units`` are available (0 when they are now)."""
        self._refill()
        if self.level >= units:
            return 0.0
        return (units - self.level) * 60 / self.per_minute

    def take(self, units: float) -> None:
        self._refill()
        self.level -= units


@dataclass
class ApiKey:
    name: str
    sha256: str
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None


class KeyStore:
    """The key file's entries by digest, and each key's buckets."""

    def __init__(self, keys: list[ApiKey], clock: Callable[[], float] = time.monotonic) -> None:
        self._by_digest = {k.sha256: k for k in keys}
        self._requests = {
            k.name: Bucket(k.requests_per_minute, clock) for k in keys if k.requests_per_minute
        }
        self._tokens = {
            k.name: Bucket(k.tokens_per_minute, clock) for k in keys if k.tokens_per_minute
        }

    def __len__(self) -> int:
        return len(self._by_digest)

    @classmethod
    def load(cls, path: Path) -> KeyStore:
        return cls(parse_keys(read_yaml(path, "API key file"), str(path)))

    def authenticate(self, authorization: str | None) -> ApiKey:
        """The key of an ``Authorization`` header value; a 401 APIError otherwise."""
        if not authorization:
            raise APIError(
                401,
                "missing API key: send 'Authorization: Bearer <key>'",
                code="missing_api_key",
            )
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(
                401, "the Authorization header must be 'Bearer <key>'", code="invalid_api_key"
            )
        key = self._by_digest.get(digest(token.strip()))
        if key is None:
            raise APIError(401, "incorrect API key", code="invalid_api_key")
        return key

    def admit(self, key: ApiKey) -> None:
        """Count one request against the key's limits; 429 with Retry-After when over."""
        limits = (
            (self._tokens, key.tokens_per_minute, "tokens_per_minute"),
            (self._requests, key.requests_per_minute, "requests_per_minute"),
        )
        for buckets, limit, code in limits:
            bucket = buckets.get(key.name)
            wait = 0.0 if bucket is None else bucket.wait_for(1)
            if wait > 0:
                what = code.replace("_", " ")
                raise APIError(
                    429,
                    f"key '{key.name}' is over its {limit} {what}",
                    code=code,
                    retry_after=wait,
                )
        requests = self._requests.get(key.name)
        if requests is not None:
            requests.take(1)

    def charge_tokens(self, key: ApiKey, tokens: int) -> None:
        bucket = self._tokens.get(key.name)
        if bucket is not None:
            bucket.take(tokens)


def parse_keys(data: Any, where: str) -> list[ApiKey]:
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ConfigError(f"{where}: expected 'keys:' with a list of {{name, sha256, ...}}")
    keys = []
    for i, raw in enumerate(data["keys"]):
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: keys[{i}] must be a mapping")
        name, sha = raw.get("name"), str(raw.get("sha256", "")).lower()
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}: keys[{i}] needs a 'name'")
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise ConfigError(f"{where}: keys[{i}] ({name}) 'sha256' must be 64 hex digits")
        limits = {}
        for field in ("requests_per_minute", "tokens_per_minute"):
            value = raw.get(field)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"{where}: keys[{i}] ({name}) '{field}' must be an integer >= 1")
            limits[field] = value
        keys.append(ApiKey(name=name, sha256=sha, **limits))
    names = [k.name for k in keys]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: key names must be unique")
    return keys
