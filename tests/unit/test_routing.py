"""The routing policy: table, threshold, overrides and fallback chains."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from serving.errors import ConfigError, ValidationError
from serving.params import Params
from serving.routing import Reason, RoutingPolicy

TABLE = {
    "completion": "llm_medium",
    "summarization": "llm_small",
    "question_answering": "llm_large",
}
ROOT = Path(__file__).resolve().parents[2]
FALLBACKS = {"llm_large": "llm_medium", "llm_medium": "llm_small", "llm_small": "llm_medium"}


def make_policy(**overrides: object) -> RoutingPolicy:
    fields = {
        "table": TABLE,
        "tiers": ("llm_small", "llm_medium", "llm_large"),
        "confidence_threshold": 0.5,
        "low_confidence_tier": "llm_medium",
        "fallbacks": FALLBACKS,
    }
    fields.update(overrides)
    return RoutingPolicy(**fields)


def params(**values: str) -> Params:
    return Params({"parameters": {k: {"string_value": v} for k, v in values.items()}}, "router")


@pytest.mark.parametrize(
    ("intent", "tier"),
    [
        ("completion", "llm_medium"),
        ("summarization", "llm_small"),
        ("question_answering", "llm_large"),
    ],
)
def test_confident_intent_follows_the_table(intent: str, tier: str) -> None:
    decision = make_policy().decide(intent, 0.9)
    assert (decision.tier, decision.reason, decision.intent) == (tier, Reason.TABLE, intent)
    assert decision.candidates[0] == tier


def test_low_confidence_goes_to_the_named_tier() -> None:
    decision = make_policy().decide("question_answering", 0.49)
    assert decision.tier == "llm_medium"
    assert decision.reason is Reason.LOW_CONFIDENCE
    assert decision.intent == "question_answering"


def test_threshold_is_inclusive_and_nan_is_not_confident() -> None:
    policy = make_policy()
    assert policy.decide("question_answering", 0.5).tier == "llm_large"
    assert policy.decide("question_answering", float("nan")).reason is Reason.LOW_CONFIDENCE


def test_intent_override_ignores_the_threshold() -> None:
    decision = make_policy().decide("summarization", 0.0, intent_forced=True)
    assert (decision.tier, decision.reason) == ("llm_small", Reason.INTENT_OVERRIDE)


def test_model_override_wins_and_has_no_fallback() -> None:
    decision = make_policy().decide("summarization", 0.99, forced_tier="llm_large")
    assert (decision.tier, decision.reason) == ("llm_large", Reason.MODEL_OVERRIDE)
    assert decision.candidates == ("llm_large",)


def test_no_classification_routes_as_low_confidence_with_its_fallbacks() -> None:
    policy = make_policy()
    decision = policy.unclassified()
    assert (decision.intent, decision.confidence) == ("unknown", 0.0)
    assert (decision.tier, decision.reason) == ("llm_medium", Reason.CLASSIFIER_UNAVAILABLE)
    assert decision.candidates == policy.chain("llm_medium")
    forced = policy.unclassified(forced_tier="llm_large")
    assert (forced.tier, forced.reason, forced.candidates) == (
        "llm_large",
        Reason.MODEL_OVERRIDE,
        ("llm_large",),
    )


def test_fallback_chain_follows_the_map_once_per_tier() -> None:
    policy = make_policy()
    assert policy.chain("llm_large") == ("llm_large", "llm_medium", "llm_small")
    assert policy.chain("llm_small") == ("llm_small", "llm_medium")
    assert make_policy(fallbacks={}).chain("llm_large") == ("llm_large",)


@pytest.mark.parametrize("bad", ["chitchat", "", "Summarization"])
def test_unknown_intent_override_is_rejected_with_the_choices(bad: str) -> None:
    with pytest.raises(ValidationError, match="use one of"):
        make_policy().check_intent(bad)


def test_unknown_model_override_is_rejected_with_the_choices() -> None:
    with pytest.raises(ValidationError, match=r"unknown model override 'llm_huge'.*llm_small"):
        make_policy().decide("completion", 1.0, forced_tier="llm_huge")


def test_policy_reads_from_config_parameters() -> None:
    policy = RoutingPolicy.from_params(
        params(
            tiers="llm_small, llm_medium,llm_large",
            routing_table=json.dumps(TABLE),
            confidence_threshold="0.6",
            low_confidence_tier="llm_small",
            fallback_tiers=json.dumps(FALLBACKS),
        )
    )
    assert policy.tiers == ("llm_small", "llm_medium", "llm_large")
    assert policy.table == TABLE
    assert policy.decide("question_answering", 0.55).tier == "llm_small"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"table": {"completion": "llm_xl"}}, "not one of the tiers"),
        ({"low_confidence_tier": "llm_xl"}, "low_confidence_tier"),
        ({"confidence_threshold": 1.5}, r"\[0, 1\]"),
        ({"fallbacks": {"llm_small": "llm_small"}}, "itself"),
        ({"fallbacks": {"llm_small": "llm_xl"}}, "outside"),
        ({"tiers": ()}, "empty"),
        ({"table": {}}, "empty"),
    ],
)
def test_bad_policy_is_a_config_error(change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make_policy(**change)


def test_missing_or_malformed_parameters_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="routing_table"):
        RoutingPolicy.from_params(params(tiers="llm_small"))
    with pytest.raises(ConfigError, match="not a name"):
        RoutingPolicy.from_params(
            params(
                tiers="llm_small",
                routing_table='{"completion": 3}',
                confidence_threshold="0.5",
                low_confidence_tier="llm_small",
            )
        )


def committed_policy(profile: str) -> RoutingPolicy:
    """The policy the router's committed config for ``profile`` declares."""
    from serving.repository import config_path, parse_config

    path = config_path(ROOT / "model_repository" / "router", profile)
    config = parse_config(path)
    raw = {k: v.string_value for k, v in config.parameters.items()}
    return RoutingPolicy.from_params(params(**raw))


def test_committed_policy_covers_exactly_the_classifier_labels() -> None:
    from serving.intent import LABELS

    assert set(committed_policy("cpu").intents) == set(LABELS)


def test_both_profiles_route_the_same_way() -> None:
    assert committed_policy("cpu") == committed_policy("h100")


def test_committed_policy_keeps_cheap_tasks_off_the_biggest_tier() -> None:
    """Summarization (long input, short grounded output) must never reach the largest
    tier, not even through the low-confidence tier or a fallback chain."""
    policy = committed_policy("cpu")
    biggest = policy.tiers[-1]
    assert policy.decide("summarization", 1.0).candidates[0] != biggest
    assert biggest not in policy.decide("summarization", 1.0).candidates
    assert biggest not in policy.decide("summarization", 0.0).candidates
    assert biggest not in policy.chain(policy.low_confidence_tier)
    assert len(set(policy.table.values())) == len(policy.table), "one size per task type"
