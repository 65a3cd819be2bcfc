"""Sentence encoders: all-MiniLM-L6-v2 for search, SmolLM2's first layers for intent.

Two encoders (:data:`ENCODERS`), one machinery:

- ``minilm`` (the ``embedding`` model): all-MiniLM-L6-v2, mean pooled, L2-normalised,
  384 floats;
- ``smollm2_prefix`` (the ``intent_encoder`` model): the first 8 decoder layers of
  SmolLM2-135M-Instruct (the GGUF the CPU tiers serve), mean pooled over the tokens, 576
  floats, not normalised. An instruction-tuned decoder's middle layers tell a question
  from a writing task from a summarization request better than a sentence-similarity
  encoder does: ``docs/intent.md`` has the measurement.

Both Triton models are the one adapter :class:`serving.embedding_model.EmbeddingModel`
over :class:`Embedder`. Two runtimes compute the same function:

- ``onnx`` (the CPU default): the PyTorch model, with pooling and normalisation folded
  into the graph, exported once per machine into :func:`serving.assets.cache_dir` and run
  by ONNX Runtime. For MiniLM it is about 1.5x faster than PyTorch on this CPU and stays
  within cosine 1e-6 of it; the intent encoder's export stores its weights in int8
  (:func:`quantize_int8`, 2.2x faster, cosine 0.993 at worst). Unit tests check the 0.99
  floor the project promises.
- ``torch``: the reference, and the runtime of the GPU profile.

Texts longer than the model's 256-token window are truncated, as sentence-transformers
does; :class:`Embeddings` says which ones were, so the model can tell the client.
"""

from __future__ import annotations

import enum
import fcntl
import hashlib
import json
import logging
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serving.assets import cache_dir, minilm_dir, smollm2_gguf
from serving.errors import ConfigError
from serving.text import text_rows

log = logging.getLogger(__name__)

DIM = 384
#: Decoder layers of SmolLM2 the intent encoder keeps (of 30): measured in docs/intent.md.
PREFIX_LAYERS = 8
#: Bump when an exported graph changes, so stale cached exports are not reused.
EXPORT_VERSION = 1
ONNX_OPSET = 17

#: (input_ids, attention_mask) int64 [batch, seq] -> normalised embeddings float32 [batch, 384]
Encoder = Callable[[np.ndarray, np.ndarray], np.ndarray]


class Runtime(str, enum.Enum):
    ONNX = "onnx"
    TORCH = "torch"

    @classmethod
    def parse(cls, text: str) -> Runtime:
        """The runtime a config parameter names, or a ConfigError listing the choices."""
        try:
            return cls(text)
        except ValueError:
            choices = ", ".join(r.value for r in cls)
            raise ConfigError(f"runtime must be one of {choices}, got {text!r}") from None


@dataclass(frozen=True)
class Embeddings:
    vectors: np.ndarray  # float32 [n, DIM], unit length
    truncated: np.ndarray  # bool [n]: the text was cut to the model's window


@dataclass(frozen=True)
class EmbeddingRequest:
    """The rows of one request (a request may carry several texts, shape [n, 1])."""

    texts: list[str]

    @classmethod
    def from_array(cls, array: np.ndarray) -> EmbeddingRequest:
        """Decode a TYPE_STRING tensor; a bad row names its index so the client can fix it."""
        return cls(text_rows(array, "text"))


def max_tokens(model_dir: Path) -> int:
    """The model's window, from sentence-transformers' own config (256 for MiniLM)."""
    config = json.loads((model_dir / "sentence_bert_config.json").read_text())
    return int(config["max_seq_length"])


def pooled_module(model_dir: Path):  # -> torch.nn.Module; torch is imported lazily
    """The torch module both runtimes compute: encoder + mean pooling + L2 norm.

    Pooling lives inside the module so the ONNX export returns [batch, 384] instead of
    every token's hidden state, which is 20-100x less data out of the runtime.
    """
    import torch
    from transformers import AutoModel

    class MeanPooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = AutoModel.from_pretrained(model_dir).eval()

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask)[0]
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    return MeanPooled().eval()


def prefix_module(gguf: Path, layers: int = PREFIX_LAYERS):  # -> torch.nn.Module
    """SmolLM2's embeddings and first ``layers`` decoder layers, mean pooled over the tokens.

    The hidden state is taken before any final norm (the model's own norm belongs after
    layer 30). Rows are right-padded and attention is causal, so a real token never sees
    padding: a row's vector does not depend on what it is batched with.
    """
    import torch

    from serving.llm.runner import load_hf_model

    base = load_hf_model(gguf).model
    base.layers = base.layers[:layers]
    base.norm = torch.nn.Identity()
    base.config.num_hidden_layers = layers

    class PrefixMean(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.base = base

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            hidden = self.base(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False
            ).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    return PrefixMean().eval()


def minilm_tokenizer(model_dir: Path):  # -> tokenizers.Tokenizer
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(model_dir / "tokenizer.json"))


def gguf_tokenizer(gguf: Path):  # -> tokenizers.Tokenizer
    from serving.llm.tokenizer import load_tokenizer

    return load_tokenizer(gguf).backend_tokenizer


#: Tokens the intent encoder reads: instructions are short; a longer one is cut and flagged.
PREFIX_WINDOW = 256


@dataclass(frozen=True)
class EncoderSpec:
    """What differs between the encoders; everything else is shared."""

    name: str
    dim: int
    describe: str
    onnx_stem: str  # the cached export's file name, before its key digest
    source: Callable[[], Path]  # the weights: a model folder or a GGUF file
    window: Callable[[Path], int]  # tokens read per text, given the source
    tokenizer: Callable[[Path], object]  # tokenizers.Tokenizer for the source
    module: Callable[[Path], object]  # the torch module both runtimes compute
    #: The ONNX export's weight matrices in int8 (:func:`quantize_int8`); torch stays float32.
    int8: bool = False


MINILM = EncoderSpec(
    "minilm",
    DIM,
    "all-MiniLM-L6-v2, mean pooled, L2-normalised",
    "minilm-mean-pooled",
    minilm_dir,
    max_tokens,
    minilm_tokenizer,
    pooled_module,
)
SMOLLM2_PREFIX = EncoderSpec(
    "smollm2_prefix",
    576,
    f"SmolLM2-135M-Instruct layers 1-{PREFIX_LAYERS}, mean pooled",
    f"smollm2_prefix{PREFIX_LAYERS}-int8",
    smollm2_gguf,
    lambda _gguf: PREFIX_WINDOW,
    gguf_tokenizer,
    prefix_module,
    int8=True,
)
ENCODERS = {spec.name: spec for spec in (MINILM, SMOLLM2_PREFIX)}


def encoder_spec(name: str) -> EncoderSpec:
    """The encoder a config parameter names, or a ConfigError listing the choices."""
    try:
        return ENCODERS[name]
    except KeyError:
        raise ConfigError(f"encoder must be one of {', '.join(ENCODERS)}, got {name!r}") from None


def torch_encoder(model_dir: Path, device: str = "cpu", spec: EncoderSpec = MINILM) -> Encoder:
    """The PyTorch reference runtime (threads are set by the caller, once per process)."""
    import torch

    module = spec.module(model_dir).to(device)

    def encode(input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = module(
                torch.from_numpy(input_ids).to(device), torch.from_numpy(attention_mask).to(device)
            )
        return out.float().cpu().numpy()

    return encode


def onnx_path(model_dir: Path, spec: EncoderSpec = MINILM) -> Path:
    """Where the export of ``model_dir`` lives: keyed by source, torch and version.

    An int8 export is also keyed by onnxruntime's version, whose tool quantizes it.
    """
    import torch

    key = f"{model_dir.resolve()}:{torch.__version__}:{ONNX_OPSET}:{EXPORT_VERSION}"
    if spec.int8:
        import onnxruntime

        key += f":int8:{onnxruntime.__version__}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_dir() / "onnx" / f"{spec.onnx_stem}-{digest}.onnx"


def export_onnx(model_dir: Path, spec: EncoderSpec = MINILM) -> Path:
    """Export the pooled model to ONNX once; safe when several instances start together.

    An exclusive file lock serialises exporters, the file is written beside its final
    name and renamed into place, so a reader never sees a partial file and the second
    instance reuses the first one's export instead of redoing it.
    """
    import torch

    target = onnx_path(model_dir, spec)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_file():
            return target
        log.info("exporting %s to ONNX at %s", model_dir.name, target)
        module = spec.module(model_dir)
        # Any token ids of either vocabulary; the second row is padded.
        ids = torch.tensor([[101, 7592, 2088, 102], [101, 7592, 102, 0]], dtype=torch.int64)
        mask = (ids != 0).to(torch.int64)
        tmp = target.with_suffix(f".tmp{os.getpid()}")
        with torch.no_grad(), warnings.catch_warnings():
            # The tracer warns about shape-dependent Python branches in transformers; the
            # unit tests check the export against PyTorch at several batch shapes.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                (ids, mask),
                str(tmp),
                input_names=["input_ids", "attention_mask"],
                output_names=["embedding"],
                dynamic_axes={
                    "input_ids": {0: "batch", 1: "seq"},
                    "attention_mask": {0: "batch", 1: "seq"},
                    "embedding": {0: "batch"},
                },
                opset_version=ONNX_OPSET,
                dynamo=False,
            )
        if spec.int8:
            quantized = target.with_suffix(f".int8tmp{os.getpid()}")
            quantize_int8(tmp, quantized)
            os.replace(quantized, tmp)
        os.replace(tmp, target)
    return target


def quantize_int8(source: Path, target: Path) -> None:
    """Store the weight matrices of ``source`` in int8; activations are quantized per call.

    Only MatMuls with a constant weight are quantized (per output channel, symmetric); the
    attention products of two activations stay float32: quantizing them cost accuracy and
    saved no time. Measured on the intent encoder (docs/intent.md): 2.2x faster at batch 1
    on one thread, as the layers' weights are a quarter of the bytes read per call.

    ``reduce_range`` keeps weights in 7 bits. Without it the u8 x s8 products overflow the
    int16 pair sums of AVX2's ``vpmaddubsw`` on CPUs without VNNI: on an AVX2 EPYC the
    full-range export's vectors fell to cosine 0.61 of float32. With it every x86-64
    kernel (AVX2, AVX-512 VNNI, AMX) computes the same integer products exactly; what
    still differs between CPUs is the float32 part (norms, attention), as in a float32
    export, and an activation that lands within rounding of a step boundary moves by one
    step. The tests therefore hold it to a cosine floor, not to exact values.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(source), load_external_data=False).graph
    constants = {init.name for init in graph.initializer}
    weighted = [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in constants]
    quantize_dynamic(
        str(source),
        str(target),
        weight_type=QuantType.QInt8,
        per_channel=True,
        reduce_range=True,
        op_types_to_quantize=["MatMul"],
        nodes_to_quantize=weighted,
    )


def onnx_encoder(path: Path, threads: int) -> Encoder:
    """An ONNX Runtime session bounded to ``threads`` and not spinning when idle."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Every model's stub shares the same cores: idle spinning would steal them.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def encode(input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        feed = {"input_ids": input_ids, "attention_mask": attention_mask}
        return session.run(["embedding"], feed)[0]

    return encode


class Embedder:
    """Tokenise, group rows of similar length, encode, and restore the input order.

    Rows in a dynamic batch have very different lengths; padding them all to the longest
    wastes most of the compute. Rows are sorted by length and encoded in chunks whose
    padded size stays under ``chunk_tokens``. Measured here with 32 Dolly instructions
    per call: 4096 tokens per chunk (one padded batch) gave 31 sentences/s, 1024 gave 60,
    256 gave 90-135; per-row cost is flat from about 64 tokens per chunk up, so small
    chunks lose no GEMM efficiency and keep activations in cache.
    """

    def __init__(
        self,
        model_dir: Path,
        encoder: Encoder,
        chunk_tokens: int = 256,
        max_rows: int = 64,
        spec: EncoderSpec = MINILM,
    ) -> None:
        self.spec = spec
        self.window = spec.window(model_dir)
        self.tokenizer = spec.tokenizer(model_dir)
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=self.window)
        self.encoder = encoder
        self.chunk_tokens = chunk_tokens
        self.max_rows = max_rows

    def chunks(self, lengths: Sequence[int]) -> list[list[int]]:
        """Row indices grouped by similar length, each group's padded size bounded."""
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        groups: list[list[int]] = []
        for i in order:
            group = groups[-1] if groups else None
            # Sorted ascending, so the new row is the longest of its group.
            if (
                group is None
                or len(group) >= self.max_rows
                or (len(group) + 1) * lengths[i] > self.chunk_tokens
            ):
                groups.append([i])
            else:
                group.append(i)
        return groups

    def embed(self, texts: Sequence[str]) -> Embeddings:
        encodings = self.tokenizer.encode_batch(list(texts))
        lengths = [len(e.ids) for e in encodings]
        vectors = np.empty((len(texts), self.spec.dim), dtype=np.float32)
        for group in self.chunks(lengths):
            width = max(lengths[i] for i in group)
            ids = np.zeros((len(group), width), dtype=np.int64)
            mask = np.zeros((len(group), width), dtype=np.int64)
            for row, i in enumerate(group):
                ids[row, : lengths[i]] = encodings[i].ids
                mask[row, : lengths[i]] = 1
            vectors[group] = self.encoder(ids, mask)
        truncated = np.array([bool(e.overflowing) for e in encodings], dtype=bool)
        return Embeddings(vectors, truncated)


def load_embedder(
    runtime: Runtime,
    threads: int,
    device: str = "cpu",
    model_dir: Path | None = None,
    chunk_tokens: int = 256,
    spec: EncoderSpec = MINILM,
) -> Embedder:
    """Build the embedder a model instance serves with (exporting to ONNX if needed).

    ``chunk_tokens`` suits the device: small chunks keep a CPU's caches warm, a GPU wants
    large ones to fill its cores.
    """
    if chunk_tokens < 1:
        raise ConfigError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    model_dir = model_dir or spec.source()
    if runtime is Runtime.ONNX:
        if device != "cpu":
            raise ConfigError("the onnx runtime is CPU only here; use runtime 'torch' on GPU")
        encoder = onnx_encoder(export_onnx(model_dir, spec), threads)
    else:
        encoder = torch_encoder(model_dir, device, spec)
    # An int8 export quantizes each input over the whole call, so a row's vector would
    # depend on its companions: one row per call keeps it batch-invariant, and costs
    # nothing on CPU (docs/intent.md: 85 rows/s in one call of 32, 99/s one by one). The
    # torch runtime (float32, the GPU profile) keeps batching.
    max_rows = 1 if runtime is Runtime.ONNX and spec.int8 else 64
    return Embedder(model_dir, encoder, chunk_tokens=chunk_tokens, max_rows=max_rows, spec=spec)
