"""The manifest of an index folder (manifest.json): one typed definition of what was indexed, with
which model, layers, projections and preconditioner, and how the build went. The indexer builds it,
indexer.store writes and reads it (checked against this definition), and everything else (the API,
`indexer info`, the benchmarks) reads its fields from a `Manifest`, never from the JSON.

The JSON keeps the keys a field was given (`to_json`: unset optional parts are left out, not
written as null), so manifests of this version read back unchanged."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# 6: a stage's budget may track the deepest blocks' layers only (Budget.min_layer_dims); 5: the high-fidelity stage may project the LM head's vocabulary side by a sketch (HighInfo.head_projection;
# the stored projections are what queries use either way); 4: the compact vectors may be stored as int8 codes (Manifest.storage) and a flat index has no FAISS
# files (built when opened); 3: the high-fidelity stage's rows may be stored as 8- or 4-bit codes
# (HighInfo.storage); 2: float16 rows (read as they are: a version 2 manifest has no `storage`, so
# float16); 1 recomputed them. Older manifests lack the newer fields, whose defaults are what they wrote.
FORMAT_VERSION = 6
READABLE_VERSIONS = (2, 3, 4, 5, 6)


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class ModelInfo(_Part):
    name_or_path: str  # a hub name as given, a local folder as an absolute path
    fingerprint: str  # engine.model_fingerprint of the weights
    class_name: str = Field(alias="class")
    dtype: str = "float32"


class LayerInfo(_Part):
    name: str
    in_features: int
    out_features: int
    r_in: int
    r_out: int


class Budget(_Part):
    dims: int
    head_share: float
    # no block layer got fewer dimensions: the budget went to the deepest blocks (engine.budget); absent
    # before version 6: 0, every block layer alike
    min_layer_dims: int = 0


class PreconditionerInfo(_Part):
    kind: str
    damping_ratio: float


class FaissInfo(_Part):
    """What indexer.ann.build_faiss built."""
    type: str
    rerank_factor: int = 1
    device: str = "cpu"
    nlist: int | None = None
    nprobe: int | None = None
    n_train: int | None = None
    m: int | None = None  # IVF-PQ: sub-quantizers, bits per code, the padded dimension
    nbits: int | None = None
    padded_dim: int | None = None


HighStorage = Literal["float16", "int8", "int4"]
CompactStorage = Literal["float32", "int8"]


class HighInfo(_Part):
    """The high-fidelity stage (high.npy): its own layers' sizes and preconditioner, and how its rows
    are stored (indexer.store.HighRows)."""
    layers: list[LayerInfo]
    dim: int
    budget: Budget
    preconditioner: PreconditionerInfo
    sample_documents: int  # the preconditioner was fitted on the first this many documents
    # the LM head's vocabulary side: engine.sketch_matrix or a Gaussian (absent before version 5: gaussian)
    head_projection: Literal["gaussian", "sketch"] = "gaussian"
    stored: str  # in words
    storage: HighStorage = "float16"  # what the reader decodes; absent (float16) in manifests before version 3


class DataInfo(_Part):
    files: list[str]
    text_field: str | None = "text"
    prompt_field: str | None = None
    response_field: str | None = None
    id_field: str | None = "id"


class Stats(_Part):
    tokens: int
    loss_tokens: int
    truncated: int
    no_loss_tokens: int
    documents: int
    skipped: int = 0
    skipped_examples: list[str] = []


class BuildInfo(_Part):
    seconds: float
    gradient_seconds: float
    tokens_per_s: float
    docs_per_s: float
    resumed_at_document: int
    device: str
    processes: int
    high_fit_seconds: float | None = None


class AppendInfo(_Part):
    files: list[str]
    documents: int
    skipped: int
    skipped_examples: list[str]
    seconds: float
    gradient_seconds: float


class Manifest(_Part):
    format_version: int = FORMAT_VERSION
    n_documents: int
    model: ModelInfo
    layers: list[LayerInfo]
    rank: int | None  # the explicit rank every layer got, or None: `budget` was spread over the layers
    budget: Budget | None
    seed: int
    include: str | None
    exclude: str | None
    max_tokens: int
    text_format: dict[str, Any] | None = None  # engine.TextFormat.to_dict
    dim: int
    storage: CompactStorage = "float32"  # the compact vectors' (indexer.store.CompactRows); float32 before version 4
    preconditioner: PreconditionerInfo
    faiss: FaissInfo
    index_type: str = "auto"  # as asked (faiss.type is what it resolved to)
    high: HighInfo | None = None
    data: DataInfo
    stats: Stats
    build: BuildInfo
    extra: dict[str, Any] | None = None  # the builder's own provenance (e.g. the demo's)
    appends: list[AppendInfo] = []

    def to_json(self) -> dict:
        return self.model_dump(mode="json", by_alias=True, exclude_unset=True)
