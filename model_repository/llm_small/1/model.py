"""A CPU LLM tier: the shared adapter in :mod:`serving.llm.tier_model` (one for all tiers)."""

from serving.llm.tier_model import TierModel as TritonPythonModel

__all__ = ["TritonPythonModel"]
