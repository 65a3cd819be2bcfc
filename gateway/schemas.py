"""Request bodies of the OpenAI endpoints, as pydantic models, and what they reject.

Fields the gateway cannot honour are refused with a 400 naming the field (``n`` other
than 1, ``tools``, ``logprobs``, ...) instead of being silently ignored. Unknown fields
are accepted, as OpenAI's API does. Extension fields (documented in docs/gateway.md):

- ``intent``: force the intent for ``model: "auto"`` (skips the classifier);
- ``priority``: ``interactive`` (default) or ``batch`` (also the ``x-priority`` header).

Types are strict, as OpenAI's are: ``"max_tokens": "10"`` or ``true`` is a 400 naming the
field, not a value quietly coerced into something the client did not write.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import from_json

from gateway.errors import APIError, bad_request

Priority = Literal["interactive", "batch"]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    include_usage: bool = False


class Message(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The message's text; content parts are accepted when they are all text."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        pieces = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_request(
                    "only text content parts are supported", "messages", "unsupported_content"
                )
            pieces.append(part["text"])
        return "".join(pieces)


class _Generation(BaseModel):
    """Options shared by chat and text completions."""

    model_config = ConfigDict(extra="allow", strict=True)
    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, lt=2**64)
    stop: str | list[str] | None = None
    n: int | None = None
    user: str | None = None
    # extensions
    intent: str | None = None
    priority: Priority | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        items = [value] if isinstance(value, str) else (value or [])
        if len(items) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in items):
            raise ValueError("stop sequences must be non-empty strings")
        return value

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def wanted_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    #: Fields that change what OpenAI returns and that this gateway cannot provide.
    UNSUPPORTED: ClassVar[tuple[str, ...]] = ()

    def refuse_unsupported(self) -> None:
        if self.n is not None and self.n != 1:
            raise bad_request(f"'n' must be 1 (got {self.n}): one choice per request", "n")
        extra = self.model_extra or {}
        for name in self.UNSUPPORTED:
            value = extra.get(name)
            if value not in (None, False, [], 0):
                raise bad_request(
                    f"'{name}' is not supported by this gateway", name, "unsupported_parameter"
                )
        if self.stream_options is not None and not self.stream:
            raise bad_request("'stream_options' is only allowed with stream=true", "stream_options")


class ChatCompletionRequest(_Generation):
    messages: list[Message] = Field(min_length=1)
    UNSUPPORTED: ClassVar[tuple[str, ...]] = (
        "tools",
        "functions",
        "tool_choice",
        "function_call",
        "logprobs",
        "top_logprobs",
        "response_format",
        "logit_bias",
        "audio",
        "modalities",
        "prediction",
    )

    def conversation(self) -> list[dict[str, str]]:
        # "developer" is OpenAI's newer name for the system role.
        return [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in self.messages
        ]


class CompletionRequest(_Generation):
    prompt: str
    UNSUPPORTED: ClassVar[tuple[str, ...]] = ("logprobs", "echo", "best_of", "suffix", "logit_bias")


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    model: str
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None

    def texts(self) -> list[str]:
        items = [self.input] if isinstance(self.input, str) else list(self.input)
        if not items:
            raise bad_request("'input' must not be empty", "input")
        for i, text in enumerate(items):
            if not text.strip():
                raise bad_request(f"'input' item {i} is empty or whitespace only", "input")
        return items


def parse(model: type[BaseModel], raw: bytes) -> Any:
    """Decode and validate a body; every problem is a 400 that names the field.

    pydantic-core's JSON reader, not ``json.loads``: the standard library accepts lone
    surrogate escapes (``"\\ud800"``, text no tokenizer can encode), ``NaN``, and raises
    RecursionError or ValueError (not a decode error) on 30,000 nested ``[`` or a
    5,000-digit number, all of which were 500s. This reader refuses each as bad JSON.
    """
    try:
        data = from_json(raw, allow_inf_nan=False)
    except ValueError as exc:
        raise APIError(
            400, f"the request body is not valid JSON: {exc}", code="invalid_json"
        ) from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        parsed = model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = [str(p) for p in first.get("loc", ())]
        param = loc[0] if loc else None
        where = ".".join(loc) or "body"
        raise bad_request(f"'{where}': {first.get('msg', 'invalid')}", param) from None
    if isinstance(parsed, _Generation):
        parsed.refuse_unsupported()
    return parsed
