"""Request and response bodies of the HTTP API."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_K = 1000
MAX_TEXT_CHARS = 1_000_000  # tokenizing more than this only to truncate it would stall a worker


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: str = Field(..., min_length=1, max_length=64, description="user, assistant, system, ...")
    content: str = Field(..., max_length=MAX_TEXT_CHARS)


class _Text(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field("", max_length=MAX_TEXT_CHARS, description="context before the response; may be empty")
    response: str | None = Field(None, min_length=1, max_length=MAX_TEXT_CHARS,
                                 description="the text to attribute (or give `messages`)")
    messages: list[Message] | None = Field(
        None, min_length=1, max_length=1000, description="instead of prompt and response: a chat whose last turn, "
        "the assistant's, is the response, formatted as the index's documents were (its chat template)")

    @field_validator("response")
    @classmethod
    def _not_blank(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("response must contain non-whitespace text")
        return v

    @model_validator(mode="after")
    def _one_query(self):
        if (self.response is None) == (self.messages is None):
            raise ValueError("give either response (with an optional prompt) or messages")
        if self.messages is not None and (self.prompt or self.messages[-1].role != "assistant"):
            raise ValueError("messages replace prompt and response, and end with the assistant's turn")
        return self

    @property
    def chat(self) -> list[dict] | None:
        return None if self.messages is None else [m.model_dump() for m in self.messages]


class _Query(_Text):
    mode: Literal["influence", "cosine"] = Field("cosine", description="inner product of preconditioned "
                                                 "gradients, or the same divided by both norms")
    precision: Literal["fast", "high"] = Field(
        "high", description="fast: the compact vectors alone; high: the compact vectors' best candidates rescored "
        "by the high-fidelity stage (larger stored vectors, EK-FAC)")


class AttributeRequest(_Query):
    k: int = Field(10, ge=1, le=MAX_K, strict=True, description="how many documents to return")
    where: dict[str, str | int | float | bool] | None = Field(
        None, max_length=8, description="only documents whose metadata has every one of these field values "
        "(exact match); scored exactly over the matching documents")
    direction: Literal["proponents", "opponents"] = Field(
        "proponents", description="the highest scores (documents that push the model towards the response), "
        "or the lowest (documents that push it away)")


class TokenRequest(_Query):
    id: str = Field(..., min_length=1, max_length=10_000, description="the document whose score is split")


class TokenScore(BaseModel):
    text: str = Field(description="the text this response token adds (\"\" inside a multi-byte character)")
    score: float | None = Field(description="its contribution to the document's score; null when not scored "
                                "(the first token of a sequence, or past the cap)")


class TokenResponse(BaseModel):
    id: str
    mode: str
    tokens: list[TokenScore] = Field(description="the response's tokens, in order (as encoded: after truncation)")
    total: float = Field(description="sum of the scored tokens' contributions")
    document_score: float = Field(description="the document's score for the whole response, as /attribute gives it")
    truncated: bool = Field(description="tokens past max_tokens_scored were not scored, or the query was truncated")
    n_scored_tokens: int
    max_tokens_scored: int


class DocumentFields(BaseModel):
    id: str
    text: str
    metadata: dict[str, Any] = Field(description="every field of the record besides its text and id")
    source: str | None = Field(None, description="the data file the document came from")
    line: int | None = Field(None, description="its line (jsonl) or row (parquet) there, from 1")


class AttributeResult(DocumentFields):
    prompt: str = Field("", description="the part of `text` that was context, not scored (prompt/response and chat records)")
    rank: int
    score: float
    stage: Literal["fast", "high"] = Field(description="the stage whose score this is (and which ranked it)")


class QueryInfo(BaseModel):
    n_tokens: int
    n_response_tokens: int = Field(description="tokens whose loss is attributed")
    truncated: bool


class AttributeResponse(BaseModel):
    results: list[AttributeResult]
    mode: str
    precision: Literal["fast", "high"] = Field(description="as asked, or fast when the index has no high-fidelity stage")
    direction: str
    k: int
    n_documents: int
    query: QueryInfo
    took_ms: float


class Document(DocumentFields):
    prompt: str
    n_tokens: int
    truncated: bool


class Health(BaseModel):
    status: Literal["ok"]
    n_documents: int
    model: str


class Reloaded(BaseModel):
    reloaded: bool = Field(description="a new index was opened (false: the folder had not changed)")
    n_documents: int


class ValueRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    queries: list[_Text] = Field(..., min_length=1, max_length=100_000, description="the model outputs to value the "
                                 "documents over (at most the server's max_value_queries)")
    group_by: list[str] = Field(..., min_length=1, max_length=4, description="metadata fields whose values form the groups")
    mode: Literal["influence", "cosine"] = Field("influence", description="influence is additive: a group's value is "
                                                 "the sum of its documents'")
    precision: Literal["fast", "high"] = Field("high", description="which stage's stored vectors score the documents")
    top: int = Field(5, ge=1, le=100, description="top documents listed per group")
    bootstrap: int = Field(1000, ge=0, le=10_000, description="resamples of the queries for the intervals (0: none)")
    seed: int = 0
    format: Literal["json", "csv"] = Field("json", description="csv: the groups flattened, as `indexer value --out x.csv`")


class ValuedDocument(BaseModel):
    id: str
    value: float


class ValueGroup(BaseModel):
    group: dict[str, Any] = Field(description="the group's metadata values; a field its documents lack is absent")
    n_documents: int
    value: float
    share_positive: float = Field(description="its documents' positive values over all documents' positive values")
    share_negative: float = Field(description="its documents' negative values over all documents' negative values")
    value_per_document: float
    ci_low: float | None = Field(description="bootstrap interval over the queries (null without bootstrap)")
    ci_high: float | None
    top_documents: list[ValuedDocument]


class ValueResponse(BaseModel):
    groups: list[ValueGroup] = Field(description="highest value first")
    group_by: list[str]
    n_queries: int
    n_documents: int
    mode: str
    precision: Literal["fast", "high"]
    total_value: float
    total_positive: float
    total_negative: float
    bootstrap: int
    confidence: float
    took_ms: float
