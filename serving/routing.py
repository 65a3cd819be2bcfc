"""The router's policy: which LLM tier serves a prompt, and where to go when it cannot.

The policy is data, read from the ``router`` model's config parameters (so it is visible
through ``/v2/models/router/config`` and changes without touching code):

- ``routing_table``: JSON object, intent -> tier model name;
- ``confidence_threshold``: below it the classifier's intent is not trusted and
  ``low_confidence_tier`` serves the prompt instead;
- ``fallback_tiers``: JSON object, tier -> the tier to try when it is not loaded or fails
  before its first token (followed as a chain, each tier tried once);
- ``tiers``: the tier model names a client may force with the ``model`` override.

Everything here is plain Python so the policy is unit-tested without Triton.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass

from serving.errors import ConfigError, ValidationError
from serving.params import Params


class Reason(str, enum.Enum):
    """Why a tier was chosen; a label on the router's request metric."""

    TABLE = "table"
    LOW_CONFIDENCE = "low_confidence"
    INTENT_OVERRIDE = "intent_override"
    MODEL_OVERRIDE = "model_override"
    CLASSIFIER_UNAVAILABLE = "classifier_unavailable"


#: The intent reported when the classifier could not answer (see
#: :meth:`RoutingPolicy.unclassified`).
UNKNOWN_INTENT = "unknown"


@dataclass(frozen=True)
class Decision:
    """The outcome of routing one prompt.

    ``candidates`` is the chosen tier followed by the tiers to fall back to, in order; it
    holds only the chosen tier when the client forced it (a forced tier that is down is
    an error the client should see, not a silent substitution).
    """

    intent: str
    confidence: float
    tier: str
    reason: Reason
    candidates: tuple[str, ...]


@dataclass(frozen=True)
class RoutingPolicy:
    """Intent -> tier table, confidence threshold and fallbacks, checked once at load."""

    table: Mapping[str, str]
    tiers: tuple[str, ...]
    confidence_threshold: float
    low_confidence_tier: str
    fallbacks: Mapping[str, str]

    def __post_init__(self) -> None:
        known = set(self.tiers)
        if not self.tiers:
            raise ConfigError("routing policy: 'tiers' is empty")
        if not self.table:
            raise ConfigError("routing policy: 'routing_table' is empty")
        for intent, tier in self.table.items():
            if tier not in known:
                raise ConfigError(
                    f"routing policy: intent '{intent}' routes to '{tier}', "
                    f"which is not one of the tiers {list(self.tiers)}"
                )
        if self.low_confidence_tier not in known:
            raise ConfigError(
                f"routing policy: low_confidence_tier '{self.low_confidence_tier}' is not "
                f"one of the tiers {list(self.tiers)}"
            )
        if not (0.0 <= self.confidence_threshold <= 1.0):
            raise ConfigError(
                f"routing policy: confidence_threshold must be in [0, 1], "
                f"got {self.confidence_threshold}"
            )
        for src, dst in self.fallbacks.items():
            if src not in known or dst not in known:
                raise ConfigError(
                    f"routing policy: fallback '{src}' -> '{dst}' names a tier outside "
                    f"{list(self.tiers)}"
                )
            if src == dst:
                raise ConfigError(f"routing policy: tier '{src}' falls back to itself")

    @classmethod
    def from_params(cls, params: Params) -> RoutingPolicy:
        """Read the policy from the router's config parameters (see the module docstring)."""
        tiers = tuple(t.strip() for t in params.get("tiers", str).split(",") if t.strip())
        return cls(
            table=_str_map(params.get("routing_table", dict), "routing_table"),
            tiers=tiers,
            confidence_threshold=params.get("confidence_threshold", float),
            low_confidence_tier=params.get("low_confidence_tier", str).strip(),
            fallbacks=_str_map(params.get("fallback_tiers", dict, default={}), "fallback_tiers"),
        )

    @property
    def intents(self) -> tuple[str, ...]:
        return tuple(self.table)

    def check_intent(self, intent: str) -> str:
        """Validate a client's ``intent`` override."""
        if intent not in self.table:
            raise ValidationError(
                f"unknown intent override '{intent}'; use one of {list(self.intents)} "
                "or leave 'intent' unset to classify the prompt"
            )
        return intent

    def check_tier(self, tier: str) -> str:
        """Validate a client's ``model`` override."""
        if tier not in self.tiers:
            raise ValidationError(
                f"unknown model override '{tier}'; use one of {list(self.tiers)} "
                "or leave 'model' unset to let the router choose"
            )
        return tier

    def decide(
        self,
        intent: str,
        confidence: float,
        *,
        intent_forced: bool = False,
        forced_tier: str | None = None,
    ) -> Decision:
        """Pick the tier for a classified (or client-declared) intent.

        A client-declared intent is trusted whatever the threshold; a forced tier wins
        over everything and gets no fallbacks.
        """
        self.check_intent(intent)
        if forced_tier is not None:
            return self._forced(intent, confidence, forced_tier)
        if intent_forced:
            tier, reason = self.table[intent], Reason.INTENT_OVERRIDE
        elif math.isnan(confidence) or confidence < self.confidence_threshold:
            tier, reason = self.low_confidence_tier, Reason.LOW_CONFIDENCE
        else:
            tier, reason = self.table[intent], Reason.TABLE
        return Decision(intent, confidence, tier, reason, self.chain(tier))

    def unclassified(self, forced_tier: str | None = None) -> Decision:
        """The decision when the classifier failed or did not answer in time.

        Routing degrades, availability does not: the prompt goes where an intent the
        classifier is unsure of goes (``low_confidence_tier``, with its fallbacks),
        reported as intent ``unknown`` with confidence 0. A forced tier still wins.
        """
        if forced_tier is not None:
            return self._forced(UNKNOWN_INTENT, 0.0, forced_tier)
        tier = self.low_confidence_tier
        return Decision(UNKNOWN_INTENT, 0.0, tier, Reason.CLASSIFIER_UNAVAILABLE, self.chain(tier))

    def _forced(self, intent: str, confidence: float, forced_tier: str) -> Decision:
        """A tier the client forced: it wins over everything and gets no fallbacks."""
        tier = self.check_tier(forced_tier)
        return Decision(intent, confidence, tier, Reason.MODEL_OVERRIDE, (tier,))

    def chain(self, tier: str) -> tuple[str, ...]:
        """``tier`` and then its fallbacks, each once, in the order the policy gives."""
        order = [tier]
        nxt = self.fallbacks.get(tier)
        while nxt is not None and nxt not in order:
            order.append(nxt)
            nxt = self.fallbacks.get(nxt)
        return tuple(order)


def _str_map(value: Mapping[str, object], name: str) -> dict[str, str]:
    out = {}
    for key, val in value.items():
        if not isinstance(val, str) or not val.strip():
            raise ConfigError(f"routing policy: '{name}' maps '{key}' to {val!r}, not a name")
        out[str(key)] = val.strip()
    return out
