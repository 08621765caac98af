"""Request and response bodies. Limits that depend on settings (k, offset, text length) are
built per app (:func:`text_search_request_model`, :func:`caption_text_request_model`,
:func:`similar_images_request_model`, :func:`image_request_body`), so the OpenAPI schema states
the configured limits. The search options' texts and grammar live in :mod:`service.options`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

from service.options import (
    FILTER_DESCRIPTION,
    FILTER_EXAMPLE,
    FILTER_JSON_SCHEMA,
    MIN_SCORE_DESCRIPTION,
    SearchFilter,
    make_page,
    offset_description,
)
from service.rerank import DEFAULT_RERANK_K, MAX_RERANK_K
from service.retrieval import Page

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


class SearchOptionsBase(BaseModel):
    """Fields every JSON search body shares: how many results, which page, which ones."""

    # Strict: "5" is not a k and 3 is not a text; wrong JSON types are 422, not coerced.
    model_config = ConfigDict(strict=True, extra="ignore")

    k: int
    offset: int
    min_score: float | None
    filter: SearchFilter | None

    @field_validator("k", "offset", "rerank_k", mode="before", check_fields=False)
    @classmethod
    def _integral_float_is_an_integer(cls, value: Any) -> Any:
        # JSON Schema counts 97.0 as an integer; 97.5, "97" and true stay invalid.
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return value

    def page(self, max_k: int) -> Page:
        """The page asked for; 422 when ``offset + k`` exceeds ``max_k``."""
        return make_page(self.k, self.offset, self.min_score, max_k, "body")


class TextQueryBase(SearchOptionsBase):
    """Fields shared by every deployment's text search bodies."""

    text: str


class RerankedTextQueryBase(TextQueryBase):
    """A text query whose (text, image) shortlist the teacher can re-rank."""

    rerank: bool
    rerank_k: int


class SimilarImagesQueryBase(SearchOptionsBase):
    """A gallery image id: find the images most like it."""

    id: str


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


def _option_fields(max_k: int, what: str) -> dict[str, Any]:
    """``create_model`` definitions of k, offset, min_score and filter, with their limits."""
    return {
        "k": (
            int,
            Field(
                min(10, max_k),
                ge=1,
                le=max_k,
                description=f"How many {what} to return, 1 to {max_k}.",
            ),
        ),
        "offset": (
            int,
            Field(0, ge=0, le=max_k - 1, description=offset_description(max_k), examples=[0]),
        ),
        "min_score": (
            float | None,
            Field(None, ge=-1.0, le=1.0, description=MIN_SCORE_DESCRIPTION, examples=[0.2]),
        ),
        "filter": (
            SearchFilter | None,
            Field(None, description=FILTER_DESCRIPTION, examples=[FILTER_EXAMPLE]),
        ),
    }


def _text_field(max_text_chars: int) -> tuple[type[str], Any]:
    return (
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
    )


def text_search_request_model(
    max_k: int, max_text_chars: int, *, rerank_default: bool = False
) -> type[RerankedTextQueryBase]:
    """The body of ``POST /search/images`` with this deployment's limits in its schema."""
    model = create_model(
        "TextSearchRequest",
        __base__=RerankedTextQueryBase,
        __doc__="A text query: find the gallery images that match it.",
        __validators__={"trim_text": field_validator("text")(_text_trimmer(max_text_chars))},
        text=_text_field(max_text_chars),
        **_option_fields(max_k, "images"),
        rerank=(bool, Field(rerank_default, description=RERANK_DESCRIPTION)),
        rerank_k=(
            int,
            Field(DEFAULT_RERANK_K, ge=1, le=MAX_RERANK_K, description=RERANK_K_DESCRIPTION),
        ),
    )
    return model


def caption_text_request_model(max_k: int, max_text_chars: int) -> type[TextQueryBase]:
    """The body of ``POST /search/captions-by-text``: a text search body without re-ranking
    (the teacher scores (text, image) pairs, not two texts)."""
    model = create_model(
        "CaptionTextSearchRequest",
        __base__=TextQueryBase,
        __doc__="A text query: find the gallery captions nearest to it.",
        __validators__={"trim_text": field_validator("text")(_text_trimmer(max_text_chars))},
        text=_text_field(max_text_chars),
        **_option_fields(max_k, "captions"),
    )
    return model


MAX_ID_CHARS = 1024


def similar_images_request_model(max_k: int) -> type[SimilarImagesQueryBase]:
    """The JSON body of ``POST /search/similar-images`` (the other form is an upload)."""
    model = create_model(
        "SimilarImagesRequest",
        __base__=SimilarImagesQueryBase,
        __doc__="A gallery image by id: find the gallery images most like it (itself left out)",
        id=(
            str,
            Field(
                min_length=1,
                max_length=MAX_ID_CHARS,
                description="A gallery image id, as search results give it (`id`).",
                examples=["test_000003.png"],
            ),
        ),
        **_option_fields(max_k, "images"),
    )
    return model


MetadataValue = str | int | float | bool | list[str] | None


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
    metadata: dict[str, MetadataValue] = Field(
        description="The image's metadata fields from the gallery manifest (what `filter` "
        "matches); {} when it has none.",
        examples=[
            {
                "objects": 2,
                "colours": ["blue", "red"],
                "shapes": ["circle", "square"],
                "sizes": ["small"],
            }
        ],
    )


_RESULTS_DESCRIPTION = (
    "Best first; fewer than k when fewer match (small index, selective filter, min_score)."
)
_COUNT_DESCRIPTION = "How many results came back (the length of `results`)."
_OFFSET_DESCRIPTION = "How many results were skipped before the first one (paging)."


class ImageSearchResponse(BaseModel):
    results: list[ImageHit] = Field(description=_RESULTS_DESCRIPTION)
    count: int = Field(ge=0, description=_COUNT_DESCRIPTION, examples=[10])
    offset: int = Field(ge=0, description=_OFFSET_DESCRIPTION, examples=[0])
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
    results: list[CaptionHit] = Field(description=_RESULTS_DESCRIPTION)
    count: int = Field(ge=0, description=_COUNT_DESCRIPTION, examples=[10])
    offset: int = Field(ge=0, description=_OFFSET_DESCRIPTION, examples=[0])
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
    runtime: str = Field(
        description="Encoder runtime that encodes queries: torch, onnx or onnx-int8 "
        "(VLD_RUNTIME, `auto` resolved).",
        examples=["onnx-int8"],
    )
    index_runtime: str = Field(
        description="Encoder runtime the served index was built with (torch for indexes "
        "built before runtimes were recorded)."
    )
    image_count: int
    caption_count: int
    rerank_available: bool = Field(description="Whether a teacher is loaded to re-rank.")
    teacher_fingerprint: str | None = Field(
        description="sha256 of the teacher's model.safetensors, when loaded."
    )
    rerank_problem: str | None = Field(
        description="Why re-ranking is unavailable (not configured, or the load error)."
    )
    metadata_fields: dict[str, Literal["string", "number", "boolean", "string_list"]] = Field(
        description="The served gallery's metadata fields (what a search `filter` can test) "
        "and their types; {} when the manifest had none.",
        examples=[
            {
                "objects": "number",
                "colours": "string_list",
                "shapes": "string_list",
                "sizes": "string_list",
            }
        ],
    )


class ReloadResponse(BaseModel):
    status: Literal["reloaded", "unchanged"] = Field(
        description="'unchanged' when CURRENT already names the served version."
    )
    index_version: str = Field(description="The version served now.")
    previous_version: str | None = Field(description="The version served before the call.")


def image_request_body(
    max_k: int,
    raw_types: tuple[str, ...],
    what: str,
    json_body: type[BaseModel] | None = None,
) -> dict[str, Any]:
    """OpenAPI ``requestBody`` of an image search (``POST /search/captions``,
    ``/search/similar-images``), parsed by hand: multipart, a raw image, or ``json_body``."""
    binary = {"type": "string", "format": "binary", "minLength": 1}  # empty: 422
    options = {
        "k": {
            "type": "integer",
            "minimum": 1,
            "maximum": max_k,
            "default": min(10, max_k),
            "description": f"How many {what} to return, 1 to {max_k}.",
        },
        "offset": {
            "type": "integer",
            "minimum": 0,
            "maximum": max_k - 1,
            "default": 0,
            "description": offset_description(max_k),
        },
        "min_score": {
            "type": "number",
            "minimum": -1,
            "maximum": 1,
            "description": MIN_SCORE_DESCRIPTION,
        },
        "filter": {**FILTER_JSON_SCHEMA, "description": "JSON text. " + FILTER_DESCRIPTION},
    }
    png_example = {
        "png": {
            "summary": "A 32x32 PNG (served at /examples/query.png)",
            "externalValue": "/examples/query.png",
        }
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
                    **options,
                },
            },
            "encoding": {
                "image": {"contentType": ", ".join(raw_types)},
                "filter": {"contentType": "application/json"},
            },
            "examples": png_example,
        }
    }
    for media_type in raw_types:
        content[media_type] = {
            "schema": {**binary, "description": "The query image as the whole body."}
        }
    content["image/png"]["examples"] = png_example
    forms = (
        "multipart/form-data with an `image` file part and optional `k`, `offset`, `min_score` "
        "and `filter` parts (each overrides its query parameter); or the raw image as the body "
        "(then the options come from the query string)"
    )
    if json_body is not None:
        content["application/json"] = {"schema": json_body.model_json_schema()}
        forms += f"; or a JSON body (application/json). {json_body.__doc__}"
    return {"required": True, "description": f"Either {forms}.", "content": content}
