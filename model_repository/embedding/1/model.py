"""A sentence encoder: the shared adapter in :mod:`serving.embedding_model` (config picks which)."""

from serving.embedding_model import EmbeddingModel as TritonPythonModel

__all__ = ["TritonPythonModel"]
