"""Request and response bodies. Limits that depend on settings (k, text length) are built per app
by :func:`text_search_request_model`, so the OpenAPI schema states the configured limits."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

from service.rerank import DEFAULT_RERANK_K, MAX_RERANK_K

# Python's str.isspace() set, spelled out so the OpenAPI pattern means the same in every
# regex engine a client or fuzzer may use (\s differs between Python, ECMA and Rust).
_SPACE = (
    r"\t\n\u000b\u000c\r\u001c-\u0020\u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
)


def trimmed_length_pattern(max_chars: int) -> str:
    """A regex accepting exactly the strings whose whitespace-trimmed length is 1..max_chars."""
    space, other = f"[{_SPACE}]", f"[^{_SPACE}]"
    if max_chars == 1:
        return f"^{space}*{other}{space}*$"
    return f"^{space}*{other}(?:[\\s\\S]{{0,{max_chars - 2}}}{other})?{space}*$"


class TextQueryBase(BaseModel):
    """Fields shared by every deployment's ``TextSearchRequest``."""

    # Strict: "5" is not a k and 3 is not a text; wrong JSON types are 422, not coerced.
    model_config = ConfigDict(strict=True, extra="ignore")

    text: str
    k: int
    rerank: bool
    rerank_k: int

    @field_validator("k", "rerank_k", mode="before")
    @classmethod
    def _integral_float_is_an_integer(cls, value: Any) -> Any:
        # JSON Schema counts 97.0 as an integer; 97.5, "97" and true stay invalid.
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return value


def _text_trimmer(max_text_chars: int) -> Callable[[type[BaseModel], str], str]:
    def trim_text(cls: type[BaseModel], value: str) -> str:
        # Lone surrogates (legal in JSON escapes) cannot reach the tokenizer: replace them.
        value = value.encode("utf-8", "replace").decode("utf-8").strip()
        if not value:
            raise ValueError("text is empty after trimming whitespace")
        if len(value) > max_text_chars:
            raise ValueError(
                f"text is {len(value)} characters after trimming; the limit is {max_text_chars}"
            )
        return value

    return trim_text


RERANK_DESCRIPTION = (
    "Re-rank the shortlist with the early-interaction teacher, which scores each (text, image) "
    "pair jointly. If the service has no teacher (none configured, or it failed to load: see "
    "/readyz), the results come back in retrieval order with `reranked: false`; not an error."
)
RERANK_K_DESCRIPTION = (
    f"Shortlist size the teacher re-scores, 1 to {MAX_RERANK_K}. The best `rerank_k` by cosine "
    "are re-ordered by the teacher; if k is larger, the rest follow in retrieval order."
)


def text_search_request_model(
    max_k: int, max_text_chars: int, *, rerank_default: bool = False
) -> type[TextQueryBase]:
    """The body of ``POST /search/images`` with this deployment's limits in its schema."""
    model = create_model(
        "TextSearchRequest",
        __base__=TextQueryBase,
        __doc__="A text query: find the gallery images that match it.",
        __validators__={"trim_text": field_validator("text")(_text_trimmer(max_text_chars))},
        text=(
            str,
            Field(
                description=(
                    f"The query, 1 to {max_text_chars} characters after trimming surrounding "
                    "whitespace."
                ),
                examples=["a red circle to the left of a blue square"],
                json_schema_extra={
                    "minLength": 1,
                    "pattern": trimmed_length_pattern(max_text_chars),
                },
            ),
        ),
        k=(
            int,
            Field(
                min(10, max_k),
                ge=1,
                le=max_k,
                description=f"How many images to return, 1 to {max_k}.",
            ),
        ),
        rerank=(bool, Field(rerank_default, description=RERANK_DESCRIPTION)),
        rerank_k=(
            int,
            Field(DEFAULT_RERANK_K, ge=1, le=MAX_RERANK_K, description=RERANK_K_DESCRIPTION),
        ),
    )
    return model


class ImageHit(BaseModel):
    rank: int = Field(ge=1, description="1 = best match.")
    id: str = Field(description="The gallery image id.")
    score: float = Field(
        description="The final score: the teacher's matching logit when re-ranked (unbounded, "
        "higher = better), otherwise the cosine similarity."
    )
    retrieval_score: float = Field(description="Cosine similarity of query and image, -1..1.")
    url: str = Field(description="Where to fetch the image: GET /images/{id}.")
    captions: list[str] = Field(description="Gallery captions linked to this image, if any.")


class ImageSearchResponse(BaseModel):
    results: list[ImageHit] = Field(description="Best first; fewer than k if the index is small.")
    k: int = Field(description="The k asked for.")
    took_ms: float = Field(ge=0, description="Server time for this request, milliseconds.")
    index_version: str = Field(description="The index version that answered.")
    reranked: bool = Field(description="Whether the teacher re-ranked these results.")


class CaptionHit(BaseModel):
    rank: int = Field(ge=1, description="1 = best match.")
    id: str = Field(description="The caption id.")
    caption: str
    score: float = Field(
        description="The final score: the teacher's matching logit when re-ranked (unbounded, "
        "higher = better), otherwise the cosine similarity."
    )
    retrieval_score: float = Field(
        description="Cosine similarity of query image and caption, -1..1."
    )
    image_id: str | None = Field(description="The gallery image this caption describes, if any.")


class CaptionSearchResponse(BaseModel):
    results: list[CaptionHit] = Field(description="Best first; fewer than k if the index is small.")
    k: int = Field(description="The k asked for.")
    took_ms: float = Field(ge=0, description="Server time for this request, milliseconds.")
    index_version: str = Field(description="The index version that answered.")
    reranked: bool = Field(description="Whether the teacher re-ranked these results.")


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"


class ReadyResponse(BaseModel):
    status: Literal["ready"] = "ready"
    index_version: str
    model_fingerprint: str
    embedding_dim: int
    image_count: int
    caption_count: int
    rerank_available: bool = Field(description="Whether a teacher is loaded to re-rank.")
    teacher_fingerprint: str | None = Field(
        description="sha256 of the teacher's model.safetensors, when loaded."
    )
    rerank_problem: str | None = Field(
        description="Why re-ranking is unavailable (not configured, or the load error)."
    )


class ReloadResponse(BaseModel):
    status: Literal["reloaded", "unchanged"] = Field(
        description="'unchanged' when CURRENT already names the served version."
    )
    index_version: str = Field(description="The version served now.")
    previous_version: str | None = Field(description="The version served before the call.")


def caption_request_body(max_k: int, raw_types: tuple[str, ...]) -> dict[str, Any]:
    """OpenAPI ``requestBody`` of ``POST /search/captions`` (parsed by hand: two encodings)."""
    binary = {"type": "string", "format": "binary", "minLength": 1}  # empty: 422
    k_schema = {
        "type": "integer",
        "minimum": 1,
        "maximum": max_k,
        "default": min(10, max_k),
        "description": f"How many captions to return, 1 to {max_k}.",
    }
    content: dict[str, Any] = {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["image"],
                "properties": {
                    "image": {
                        **binary,
                        "description": (
                            "The query image: JPEG, PNG, WEBP, GIF (first frame), BMP or TIFF, "
                            "recognised by content, at most the upload limit in bytes and the "
                            "pixel limit in width x height."
                        ),
                    },
                    "k": k_schema,
                },
            },
            "encoding": {"image": {"contentType": ", ".join(raw_types)}},
            "examples": {
                "png": {
                    "summary": "A 32x32 PNG (served at /examples/query.png)",
                    "externalValue": "/examples/query.png",
                }
            },
        }
    }
    for media_type in raw_types:
        content[media_type] = {
            "schema": {**binary, "description": "The query image as the whole body."}
        }
    content["image/png"]["examples"] = {
        "png": {
            "summary": "A 32x32 PNG (served at /examples/query.png)",
            "externalValue": "/examples/query.png",
        }
    }
    return {
        "required": True,
        "description": (
            "Either multipart/form-data with an `image` file part and an optional `k` part, or "
            "the raw image as the body (then `k` comes from the query string)."
        ),
        "content": content,
    }
