"""The index folder format: the one module that knows its files. The indexer writes through
`IndexWriter`; the API (and anyone else) reads through `Index`.

    DIR/manifest.json          what was indexed, with which model, layers, ranks and preconditioner
    DIR/state.pt               projection matrices and preconditioner state (torch, weights_only)
    DIR/vectors.npy            the compact (N, dim) preconditioned LoGra vectors (CompactRows: int8 codes of the
                               unit rows, or float32 rows as written), memory-mapped
    DIR/scales.npy             float32 (N,) their per-row scales (int8)
    DIR/norms.npy              float32 (N,) their norms
    DIR/faiss-influence.index  FAISS inner-product index over the vectors (compressed types only: an exact
    DIR/faiss-cosine.index     ... and over the unit-normalised vectors      flat index is built when opened)
    DIR/documents.lance        LanceDB table `documents`: row, id, text, prompt, metadata (JSON), ...
    DIR/high.npy               the high-fidelity stage's rows (HighRows: float16, int8 or int4 codes), memory-mapped
    DIR/high-scales.npy        float32 (N,) their per-row scales (int8 and int4)
    DIR/high-norms.npy         float32 (N,) the high-fidelity vectors' norms

Row i of the table is row i of vectors.npy and id i of both FAISS indexes. An index is built in a
sibling temporary folder and renamed into place, so DIR is never half-written.
"""
from __future__ import annotations

import io
import json
import os
import struct
import shutil
import warnings
import fcntl
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import faiss

from pydantic import ValidationError

from .ann import MODES, build_faiss, flat_indexes, unit_rows  # noqa: F401  (unit_rows: the writers' and readers' one definition)
from .manifest import FORMAT_VERSION, READABLE_VERSIONS, LayerInfo, Manifest

# LanceDB logs a warning for every table it creates ("No existing dataset ... it will be created"):
# noise on every build. Its Rust logger reads LANCEDB_LOG once, at import; a user's setting wins.
os.environ.setdefault("LANCEDB_LOG", "error")
import lancedb  # noqa: E402
import numpy as np
import pyarrow as pa
import pyarrow.feather  # noqa: F401  (pa.feather)
import torch

if TYPE_CHECKING:
    from engine import LoGra, Preconditioner

MANIFEST = "manifest.json"
STATE = "state.pt"
VECTORS = "vectors.npy"
# The high-fidelity stage's vectors (indexes built with it): unit rows, their float32 norms apart (a
# whitened gradient's entries span more than float16's range; a unit row's do not). The rows are stored
# as the manifest's `high.storage` says (HighRows): float16, or integer codes with a float32 scale per row.
HIGH_VECTORS = "high.npy"
HIGH_SCALES = "high-scales.npy"
HIGH_NORMS = "high-norms.npy"
HIGH_FILES = (HIGH_VECTORS, HIGH_SCALES, HIGH_NORMS)
HIGH_STORAGES = ("float16", "int8", "int4")
# int4 codes -8..7 in steps of INT4_CLIP x the unit row's rms / 7: entries beyond +-2.5 rms are clipped (a
# whitened gradient's few large entries would otherwise coarsen every other one's step; docs/indexing.md
# has the measurements). int8 codes -127..127 in steps of the row's largest |entry| / 127.
INT4_CLIP = 2.5
NORMS = "norms.npy"
# The compact vectors (indexes of format 4): int8 codes of the unit rows with a float32 scale per row (as the
# high-fidelity stage's int8; the norms apart), or float32 rows as written (every index before format 4).
# int8 ranks as float32 does within the quality benchmarks' error (docs/indexing.md).
SCALES = "scales.npy"
STORAGES = ("float32", "int8")
TABLE = "documents"
REQUIRED = (MANIFEST, STATE, VECTORS, NORMS, f"{TABLE}.lance")  # and the FAISS files of a compressed type
# LanceDB's own full-text (BM25) indexes over these columns: the keyword candidates of a query (Index.keyword_rows)
KEYWORD_COLUMNS = ("text", "prompt")
DOCUMENT_SCHEMA = pa.schema([
    ("row", pa.int64()),
    ("id", pa.string()),
    ("text", pa.string()),
    ("prompt", pa.string()),
    ("metadata", pa.string()),  # JSON: records carry arbitrary, heterogeneous fields
    ("source", pa.string()),
    ("line", pa.int64()),
    ("n_tokens", pa.int64()),
    ("truncated", pa.bool_()),
])


_MISSING = object()


class IndexFormatError(ValueError):
    """The folder is not a complete index this version can read."""


class ModelMismatchError(ValueError):
    """The model given for an index is not the model that built it."""


def faiss_path(root: Path, mode: str) -> Path:
    return root / f"faiss-{mode}.index"


def read_manifest(root: str | Path) -> Manifest:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise IndexFormatError(f"{root} is not an index folder: no {MANIFEST}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IndexFormatError(f"{path} is corrupt: {e}") from e
    if not isinstance(data, dict):
        raise IndexFormatError(f"{path} is corrupt: not a JSON object")
    if data.get("format_version") not in READABLE_VERSIONS:
        raise IndexFormatError(f"{root} has index format {data.get('format_version')}; this version reads "
                               f"{' and '.join(map(str, READABLE_VERSIONS))}")
    try:
        return Manifest.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()[:5])
        raise IndexFormatError(f"{path} is corrupt: {problems}") from None


def document_pair(prompt: str, text: str) -> tuple[str, str]:
    """A document is stored as its whole text and the prompt that begins it; the response (the part
    whose tokens carry the loss) is the rest."""
    return prompt, text[len(prompt):]


class IndexWriter:
    """Writes an index into `.NAME.building` beside `out` and renames it into place on `commit`.

    Pass 1 writes shards: raw gradients (npy) and document rows (Arrow), then atomically replaces
    `checkpoint.pt`, the commit point of that shard (it also carries the caller's running state,
    e.g. preconditioner sums). A build killed at any moment and rerun with the same `key` resumes
    after the last checkpointed shard; files past it are discarded. Another key starts afresh.

    Several processes (`rank` of `world`) share one build: shard i of the input is written by
    process i % world, each process checkpoints its own shards (`checkpoint-RANK.pt`), rank 0 owns
    the folder (lock, creation, commit) and the others join it once rank 0 has made it. After the
    gradient pass rank 0 `merge`s: the shards, numbered in input order, are then read as one build.
    With several machines the folder must be on a filesystem they all share."""

    def __init__(self, out: str | Path, overwrite: bool = False, key: str = "", base: "Index | None" = None,
                 rank: int = 0, world: int = 1):
        """`base`: an opened index whose documents and vectors come first (append); new rows follow."""
        self.base = base
        self.row_offset = len(base) if base is not None else 0
        self.out = Path(out).resolve()
        self.tmp = self.out.with_name(f".{self.out.name}.building")
        self.shard_dir = self.tmp / "shards"
        self.key = key
        self.rank, self.world = rank, world
        self.owner = rank == 0
        self.resumed: dict | None = None  # the caller's state at the last checkpoint, when resuming
        self.n_rows = 0  # this process's documents and shards (all of them, for rank 0, after merge)
        self.n_shards = 0
        if self.owner:
            self._create(overwrite)
        elif not (self.tmp / "key").is_file():
            raise ValueError(f"process {rank} cannot see the build folder {self.tmp} that process 0 prepared: "
                             "with several machines, --out must be on a filesystem all of them share")
        elif (self.tmp / "key").read_text() != key:
            raise ValueError(f"process {rank} is not building what process 0 is: every process needs the same "
                             "options, model and data files (same paths, sizes and modification times)")
        checkpoint = self._checkpoint
        if checkpoint.is_file():
            ck = torch.load(checkpoint, weights_only=True)
            self.n_rows, self.n_shards, self.resumed = ck["n_rows"], ck["n_shards"], ck["state"]
        for path in self.shard_dir.iterdir():  # this process's shards written after its checkpoint: redo them
            i = int(path.name.split("-")[1].split(".")[0])
            if i % world == rank and i >= self._shard_number(self.n_shards):
                path.unlink()

    def _create(self, overwrite: bool) -> None:
        """Rank 0: take the lock, then resume the partial build of the same key or start afresh."""
        if self.out.exists():
            if not overwrite:
                raise FileExistsError(f"{self.out} already exists; pass --overwrite to replace it")
            # Never delete something that is not an index: a typo in --out must not wipe a folder.
            if not self.out.is_dir() or not ((self.out / MANIFEST).is_file() or not any(self.out.iterdir())):
                raise FileExistsError(f"{self.out} exists and is not an index folder; --overwrite only replaces indexes")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.out.with_name(f".{self.out.name}.lock"), "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FileExistsError(f"another build is writing {self.out}") from None
        if not ((self.tmp / "key").is_file() and (self.tmp / "key").read_text() == self.key and self.shard_dir.is_dir()):
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.shard_dir.mkdir(parents=True)
            (self.tmp / "key").write_text(self.key)

    @property
    def _checkpoint(self) -> Path:
        return self.tmp / ("checkpoint.pt" if self.world == 1 else f"checkpoint-{self.rank}.pt")

    def _shard_number(self, k: int) -> int:
        """The input-order number of this process's k-th shard."""
        return self.rank + k * self.world

    @property
    def next_shard(self) -> int:
        """The input-order number of the next shard this process writes."""
        return self._shard_number(self.n_shards)

    def owns(self, shard: int) -> bool:
        return shard % self.world == self.rank

    def merge(self, n_shards: int, n_rows: int) -> None:
        """Rank 0, once every process has written its shards: read all `n_shards` (`n_rows`
        documents), in input order, from here on."""
        self.rank, self.world, self.n_shards, self.n_rows = 0, 1, n_shards, n_rows

    # -- pass 1: documents and raw projected gradients, a shard at a time --------------------
    def add_shard(self, rows: list[dict], raw_gradients: np.ndarray, state: dict | None = None) -> None:
        """rows: dicts with DOCUMENT_SCHEMA fields except `row` (assigned here); raw gradients in
        the same order; `state`: what the caller needs to resume after this shard."""
        if len(rows) != raw_gradients.shape[0]:
            raise ValueError("one gradient row per document")
        i = self.next_shard
        np.save(self.shard_dir / f"raw-{i:06d}.npy", raw_gradients.astype(np.float32))
        first = self.row_offset + self.n_rows
        table = pa.Table.from_pylist([{**r, "row": first + j} for j, r in enumerate(rows)], schema=DOCUMENT_SCHEMA)
        pa.feather.write_feather(table, self.shard_dir / f"rows-{i:06d}.arrow")
        self.n_rows += len(rows)
        self.n_shards += 1
        _atomic_torch_save({"n_rows": self.n_rows, "n_shards": self.n_shards, "state": state or {}}, self._checkpoint)

    def raw_shards(self) -> Iterable[np.ndarray]:
        """This process's raw gradient shards (every shard, in input order, after `merge`)."""
        for k in range(self.n_shards):
            yield np.load(self.shard_dir / f"raw-{self._shard_number(k):06d}.npy")

    def documents(self) -> Iterable[list[tuple[str, str]]]:
        """This build's documents as (prompt, text), shard by shard in input order (after `merge`)."""
        for k in range(self.n_shards):
            t = pa.feather.read_table(self.shard_dir / f"rows-{self._shard_number(k):06d}.arrow", columns=["prompt", "text"])
            yield [(p or "", x) for p, x in zip(t.column("prompt").to_pylist(), t.column("text").to_pylist())]

    def write_table(self) -> None:
        def batches():
            for s in range(0, self.row_offset, 8192):  # the base table, streamed in row order
                rows = self.base.table.take_offsets(list(range(s, min(s + 8192, self.row_offset)))).to_arrow()
                yield from rows.select(DOCUMENT_SCHEMA.names).sort_by("row").cast(DOCUMENT_SCHEMA).to_batches()
            start = self.row_offset
            for k in range(self.n_shards):  # rows numbered here, in input order (a process knows only its own shards)
                table = pa.feather.read_table(self.shard_dir / f"rows-{self._shard_number(k):06d}.arrow")
                rows = pa.array(np.arange(start, start + table.num_rows), pa.int64())
                yield from table.set_column(table.schema.get_field_index("row"), "row", rows).to_batches()
                start += table.num_rows
        table = lancedb.connect(self.tmp).create_table(TABLE, data=pa.RecordBatchReader.from_batches(DOCUMENT_SCHEMA, batches()),
                                                       mode="overwrite")
        with warnings.catch_warnings():  # the sync API's create_fts_index is the native (Lance) index, marked deprecated
            warnings.simplefilter("ignore")
            for column in KEYWORD_COLUMNS:
                table.create_fts_index(column, replace=True)

    # -- pass 2: preconditioned vectors and FAISS ----------------------------------------------
    def write_vectors(self, vectors: Iterable[np.ndarray], dim: int, storage: str, block_rows: int = 65536) -> None:
        """Preconditioned vectors of the new documents, after the base index's own (if any), stored as
        `storage` (STORAGES). Written block by block through a file, not a memory map: mapped pages
        would count in the indexer's memory until the end, so its peak would grow with the corpus."""
        if storage not in STORAGES:
            raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")
        total = self.row_offset + self.n_rows
        norms = np.zeros(total, dtype=np.float32)
        scales = np.zeros(total, dtype=np.float32)
        start = 0

        def put(f, block: np.ndarray) -> None:
            nonlocal start
            block = np.ascontiguousarray(block, dtype=np.float32)
            if start + len(block) > total:
                raise RuntimeError(f"more vectors than the {total} documents")
            at = slice(start, start + len(block))
            if storage == "float32":
                f.write(block.tobytes())
                norms[at] = np.linalg.norm(block, axis=1)
            else:
                codes, scales[at], norms[at] = encode_rows(block, storage)
                f.write(codes.tobytes())
            start += len(block)

        with open(self.tmp / VECTORS, "wb") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "<f4" if storage == "float32" else "|i1",
                                                     "fortran_order": False, "shape": (total, dim)})
            if self.base is not None:  # as the base stores them (int8 codes re-encode to themselves)
                for _, block in VectorFile(self.base.root / VECTORS).blocks(block_rows):
                    put(f, block)
                norms[: self.row_offset] = self.base.norms
            for block in vectors:
                put(f, block)
        if start != total:
            raise RuntimeError(f"wrote {start} vectors for {total} documents")
        np.save(self.tmp / NORMS, norms)
        if storage != "float32":
            np.save(self.tmp / SCALES, scales)
        else:
            (self.tmp / SCALES).unlink(missing_ok=True)

    # -- the high-fidelity stage: fitted state, then its vectors ---------------------------------
    @property
    def high_state(self) -> dict | None:
        """The high-fidelity stage's fitted engine state saved by this build before it was killed."""
        path = self.tmp / "high-state.pt"
        return torch.load(path, weights_only=True) if path.is_file() else None

    def save_high_state(self, state: dict) -> None:
        _atomic_torch_save(state, self.tmp / "high-state.pt")

    def high_vectors(self, dim: int, storage: str) -> "HighVectorWriter":
        """The writer of this process's high-fidelity rows: the build's own (one process, or after
        `merge`), else a folder of this process's that `merge_high` reads."""
        if self.world == 1:
            return HighVectorWriter(self.tmp, dim, storage, self.base)
        folder = self.tmp / f"high-{self.rank}"
        folder.mkdir(exist_ok=True)
        return HighVectorWriter(folder, dim, storage)

    def merge_high(self, world: int, shard_size: int, dim: int, storage: str) -> None:
        """Rank 0, after `merge`: the high-fidelity rows `world` processes wrote (`high_vectors`), one
        after the other in input order (shard i is process i % world's), copied as stored into the
        build's rows. Started afresh if a kill interrupted it."""
        folders = [self.tmp / f"high-{r}" for r in range(world)]
        parts = [HighRows.open(f, storage, dim) for f in folders]
        out = HighVectorWriter(self.tmp, dim, storage)
        out.rewind(0)
        at = [0] * world
        for i in range(self.n_shards):
            part, n = parts[i % world], min(shard_size, self.n_rows - i * shard_size)
            rows = slice(at[i % world], at[i % world] + n)
            scales = part.scales[rows] if part.scales is not None else np.ones(n, np.float32)
            out.add_stored(np.asarray(part.codes[rows]), scales, part.norms[rows])
            at[i % world] += n
        if at != [len(p) for p in parts]:
            raise IndexFormatError(f"the processes wrote {[len(p) for p in parts]} high-fidelity rows, not {at}")
        out.checkpoint()
        out.close(self.n_rows)  # the processes' folders stay until `commit`: a kill before it merges again

    def write_faiss(self, index_type: str = "auto", nlist: int | None = None, block: int | None = None) -> dict:
        return write_faiss(self.tmp, index_type, nlist=nlist, block=block)

    def commit(self, manifest: Manifest, state: dict) -> Manifest:
        """Write table, manifest and state, then rename the folder into place; returns the manifest."""
        self.write_table()
        torch.save(state, self.tmp / STATE)
        manifest = Manifest.model_validate({**manifest.to_json(), "format_version": FORMAT_VERSION,
                                            "n_documents": self.row_offset + self.n_rows})
        (self.tmp / MANIFEST).write_text(json.dumps(manifest.to_json(), indent=2, sort_keys=True))
        shutil.rmtree(self.shard_dir)
        for path in [*self.tmp.glob("checkpoint*.pt"), self.tmp / "key"]:
            path.unlink()
        for path in (self.tmp / "high-state.pt", self.tmp / HighVectorWriter.PROGRESS, self.tmp / HighVectorWriter.NORMS,
                     self.tmp / HighVectorWriter.SCALES):
            path.unlink(missing_ok=True)
        for folder in self.tmp.glob("high-[0-9]*"):  # the processes' own rows (merge_high copied them)
            shutil.rmtree(folder)
        old = None
        if self.out.exists():  # --overwrite: move the old index aside only once the new one is complete
            old = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
            self.out.rename(old)
        self.tmp.rename(self.out)
        if old is not None:
            shutil.rmtree(old)
        self.release()
        return manifest

    def abort(self) -> None:
        """Give up: remove the partial build (for errors a rerun of the same command cannot fix).
        Only the owner (rank 0) touches the folder."""
        if self.owner:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.release()

    def release(self) -> None:
        """Keep the partial build (resumable) and let go of the lock."""
        if not self.owner:
            return
        self.out.with_name(f".{self.out.name}.lock").unlink(missing_ok=True)
        self._lock.close()


def _code_layout(storage: str, dim: int) -> tuple[str, int]:
    """The .npy dtype of HIGH_VECTORS and its columns for rows of `dim` dimensions stored as `storage`."""
    if storage == "float16":
        return "<f2", dim
    if storage == "int8":
        return "|i1", dim
    if storage == "int4":
        return "|u1", (dim + 1) // 2  # two codes a byte: column j holds dims 2j (low nibble) and 2j + 1 (high)
    raise ValueError(f"high-fidelity storage must be one of {HIGH_STORAGES}, got {storage!r}")


def high_bytes_per_document(storage: str, dim: int) -> int:
    """What the high-fidelity stage stores per document: its codes, a float32 scale (int8, int4) and a
    float32 norm."""
    descr, width = _code_layout(storage, dim)
    return width * np.dtype(descr).itemsize + (4 if storage != "float16" else 0) + 4


def compact_bytes_per_document(storage: str, dim: int) -> int:
    """What the compact vectors store per document: float32 rows, or int8 codes and a float32 scale; and a float32 norm."""
    return (4 * dim if storage == "float32" else dim + 4) + 4


def vector_bytes_per_document(manifest: Manifest, precision: str) -> int:
    """Vector bytes a document of this index stores for a query `precision` ("fast": its compact
    row; "high": that and its high-fidelity row)."""
    n = compact_bytes_per_document(manifest.storage, manifest.dim)
    return n + (high_bytes_per_document(manifest.high.storage, manifest.high.dim) if precision == "high" else 0)


def encode_rows(vectors: np.ndarray, storage: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What is stored of float vectors (rows): (codes, scales, norms). The unit rows are stored as
    `storage` says: float16 (scales 1), or integer codes c with scale 1 / |c|, so that a row reads
    back as c x scale, a unit row in the quantized direction (int8: c = round(127 u / max |u|);
    int4: c = round(u / step) clipped to -8..7, step = INT4_CLIP rms(u) / 7, packed two a byte). A
    zero vector is stored as zero codes, scale 0 and norm 0."""
    _code_layout(storage, 1)  # a known storage
    norms = np.linalg.norm(vectors, axis=1)
    unit = vectors / np.where(norms > 0, norms, 1.0)[:, None]
    if storage == "float16":  # as version 2 indexes were written
        return unit.astype(np.float16), np.ones(len(unit), np.float32), norms.astype(np.float32)
    unit = np.asarray(unit, dtype=np.float32)
    if storage == "int8":
        step, lo, hi = np.abs(unit).max(axis=1, initial=0.0) / 127, -127, 127
    else:
        step, lo, hi = INT4_CLIP * np.sqrt(np.mean(np.square(unit), axis=1)) / 7, -8, 7
    codes = unit  # a new array: worked in place (for 65k-wide rows each temporary costs as much as the arithmetic)
    np.divide(codes, np.where(step > 0, step, 1)[:, None], out=codes)
    np.clip(np.rint(codes, out=codes), lo, hi, out=codes)
    length = np.linalg.norm(codes, axis=1)
    scales = np.divide(1.0, length, out=np.zeros_like(length), where=length > 0).astype(np.float32)
    if storage == "int4":
        codes += 8
        nibbles = codes.astype(np.uint8)
        if nibbles.shape[1] % 2:
            nibbles = np.pad(nibbles, ((0, 0), (0, 1)), constant_values=8)  # code 0
        codes = nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)
    else:
        codes = codes.astype(np.int8)
    return codes, scales, norms.astype(np.float32)


def decode_rows(codes: np.ndarray, scales: np.ndarray | None, storage: str, dim: int) -> np.ndarray:
    """Stored rows (encode_rows's codes and scales) as float32 unit rows: a new, writable array."""
    if storage == "float16":
        return np.array(codes, dtype=np.float32)
    if storage == "int8":
        x = np.array(codes, dtype=np.float32)
    else:  # each byte's two codes, low nibble first (bitwise into float32 directly: 6x a lookup table's speed)
        codes = np.asarray(codes)
        x = np.empty((*codes.shape, 2), np.float32)
        np.bitwise_and(codes, 15, out=x[..., 0], casting="unsafe")
        np.right_shift(codes, 4, out=x[..., 1], casting="unsafe")
        x = x.reshape(len(codes), -1)
        x -= 8
        if x.shape[1] != dim:  # an odd dim's padding code
            return x[:, :dim] * np.asarray(scales, dtype=np.float32)[:, None]
    x *= np.asarray(scales, dtype=np.float32)[:, None]
    return x


class HighRows:
    """The high-fidelity stage's stored rows: codes memory-mapped (HIGH_VECTORS: 1M documents do not fit
    in memory), per-row scales and norms in memory. Every reader goes through `rows` or `blocks`, which
    give float32 unit rows whatever the storage; the norms are the vectors' own (float32)."""

    def __init__(self, codes: np.ndarray, scales: np.ndarray | None, norms: np.ndarray, storage: str, dim: int):
        self.codes, self.scales, self.norms, self.storage, self.dim = codes, scales, norms, storage, dim

    @classmethod
    def open(cls, root: str | Path, storage: str, dim: int) -> "HighRows":
        """The rows of an index (or build) folder; IndexFormatError if the files are not `storage` rows of `dim`."""
        root = Path(root)
        descr, width = _code_layout(storage, dim)
        codes = np.load(root / HIGH_VECTORS, mmap_mode="r")
        scales = np.load(root / HIGH_SCALES) if storage != "float16" else None
        norms = np.load(root / HIGH_NORMS)
        if codes.dtype != np.dtype(descr) or codes.ndim != 2 or codes.shape[1] != width:
            raise IndexFormatError(f"{root / HIGH_VECTORS} holds {codes.dtype} {codes.shape}, not {storage} rows of "
                                   f"{dim} dimensions")
        return cls(codes, scales, norms, storage, dim)

    def __len__(self) -> int:
        return self.codes.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return len(self), self.dim

    def sizes(self) -> dict[str, int]:
        """Rows each file holds (Index.open checks them against the manifest)."""
        return {"high": len(self), "high_norms": len(self.norms),
                **({"high_scales": len(self.scales)} if self.scales is not None else {})}

    def rows(self, rows: slice | range | np.ndarray | list[int]) -> np.ndarray:
        """float32 unit rows (a new array) of a slice, range or list of row numbers, in the order asked."""
        if isinstance(rows, range) and rows.step == 1:
            rows = slice(rows.start, rows.stop)
        elif not isinstance(rows, slice):
            rows = np.asarray(rows, dtype=np.int64)
        scales = None if self.scales is None else self.scales[rows]
        return decode_rows(self.codes[rows], scales, self.storage, self.dim)

    def blocks(self, rows: range | None = None, block_rows: int = 8192) -> Iterable[tuple[range, np.ndarray]]:
        """(rows, float32 unit rows) of `rows` (default: all), `block_rows` at a time, in file order."""
        rows = range(len(self)) if rows is None else rows
        for s in range(rows.start, rows.stop, block_rows):
            r = range(s, min(s + block_rows, rows.stop))
            yield r, self.rows(r)


class HighVectorWriter:
    """Writes HIGH_VECTORS, HIGH_SCALES (int8, int4) and HIGH_NORMS into a build folder, rows appended
    in order, a block at a time (plain writes, not a memory map, so the indexer's memory does not grow
    with the corpus); the number of rows need not be known ahead (the gradient pass streams). After each
    `checkpoint` the file is flushed and PROGRESS records the rows written: a killed build resumes after
    them (`rows`). An append's writer starts with the base index's rows, copied as they are stored."""
    PROGRESS = "high-progress.json"
    NORMS = "high-norms.partial.npy"  # the norms written so far; kept until commit, so a closed writer resumes
    SCALES = "high-scales.partial.npy"  # ... and the scales
    # room for the .npy header of any row count; the final header is padded to it (`close`)
    _RESERVED_ROWS = 10**15

    def __init__(self, folder: Path, dim: int, storage: str, base: "Index | None" = None):
        self.folder, self.dim, self.storage = folder, dim, storage
        self.descr, self.width = _code_layout(storage, dim)
        self.row_bytes = self.width * np.dtype(self.descr).itemsize
        self.quantized = storage != "float16"
        self.offset = len(_npy_header((self._RESERVED_ROWS, self.width), self.descr))
        progress = folder / self.PROGRESS
        done = json.loads(progress.read_text()) if progress.is_file() else {}
        if (done.get("dim"), done.get("offset"), done.get("storage", "float16")) == (dim, self.offset, storage):
            self.rows, self.norms = done["rows"], [np.load(folder / self.NORMS)]
            self.scales = [np.load(folder / self.SCALES)] if self.quantized else []
            self._file = open(folder / HIGH_VECTORS, "r+b")
            return
        self.rows, self.norms, self.scales = 0, [], []
        self._file = open(folder / HIGH_VECTORS, "w+b")
        self._file.write(_npy_header((self._RESERVED_ROWS, self.width), self.descr))
        if base is not None:
            old = base.high_store
            if old is None or old.dim != dim or old.storage != storage:
                raise IndexFormatError(f"{base.root} has no high-fidelity vectors of dim {dim} stored as {storage}")
            for s in range(0, len(base), 8192):
                scales = old.scales[s : s + 8192] if self.quantized else np.ones(len(old.norms[s : s + 8192]), np.float32)
                self.add_stored(np.asarray(old.codes[s : s + 8192]), scales, old.norms[s : s + 8192])
            self.checkpoint()

    @staticmethod
    def empty(n: int, dim: int, storage: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Zeroed (codes, scales, norms) for `n` rows, to be filled from `encode_rows`'s results."""
        descr, width = _code_layout(storage, dim)
        return np.zeros((n, width), dtype=descr), np.zeros(n, np.float32), np.zeros(n, np.float32)

    def add(self, vectors: np.ndarray) -> None:
        """The next rows' vectors (float32 or float64)."""
        self.add_stored(*encode_rows(vectors, self.storage))

    def add_stored(self, codes: np.ndarray, scales: np.ndarray, norms: np.ndarray) -> None:
        """The next rows, already as `encode_rows` returns them for this writer's storage."""
        if codes.ndim != 2 or codes.shape[1] != self.width or np.dtype(codes.dtype) != np.dtype(self.descr):
            raise ValueError(f"{codes.dtype} {codes.shape} rows are not {self.storage} rows of {self.dim} dimensions")
        self._file.seek(self.offset + self.rows * self.row_bytes)
        self._file.write(np.ascontiguousarray(codes).tobytes())
        self.norms.append(np.asarray(norms, dtype=np.float32))
        if self.quantized:
            self.scales.append(np.asarray(scales, dtype=np.float32))
        self.rows += len(codes)

    def rewind(self, rows: int) -> None:
        """Keep only the first `rows` rows (those a resumed gradient pass has checkpointed)."""
        if rows > self.rows:
            raise IndexFormatError(f"the partial build's high-fidelity vectors stop at row {self.rows}, before its "
                                   f"checkpoint at {rows}; rebuild with --overwrite")
        self.norms = [np.concatenate(self.norms)[:rows]] if self.norms else []
        self.scales = [np.concatenate(self.scales)[:rows]] if self.scales else []
        self.rows = rows

    def _joined(self, parts: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)

    def checkpoint(self) -> None:
        """Make the rows added so far survive a kill."""
        self._file.flush()
        os.fsync(self._file.fileno())
        for parts, name in [(self.norms, self.NORMS)] + ([(self.scales, self.SCALES)] if self.quantized else []):
            joined = self._joined(parts)
            parts[:] = [joined]
            tmp = self.folder / (name + ".tmp.npy")
            np.save(tmp, joined)
            os.replace(tmp, self.folder / name)
        tmp = self.folder / (self.PROGRESS + ".tmp")
        tmp.write_text(json.dumps({"dim": self.dim, "rows": self.rows, "offset": self.offset, "storage": self.storage}))
        os.replace(tmp, self.folder / self.PROGRESS)

    def close(self, total: int) -> None:
        """All `total` rows written: the final header, norms and scales files (the progress stays until
        the index is committed: a build that fails after this resumes with the rows complete)."""
        if self.rows != total:
            raise RuntimeError(f"wrote {self.rows} high-fidelity vectors for {total} documents")
        self._file.truncate(self.offset + total * self.row_bytes)
        self._file.seek(0)
        self._file.write(_npy_header((total, self.width), self.descr, pad_to=self.offset))
        self._file.close()
        np.save(self.folder / HIGH_NORMS, self._joined(self.norms))
        if self.quantized:
            np.save(self.folder / HIGH_SCALES, self._joined(self.scales))


def _npy_header(shape: tuple[int, int], descr: str = "<f2", pad_to: int | None = None) -> bytes:
    """The .npy (version 1.0) header of an array of `descr` and `shape`, padded with spaces to `pad_to`
    bytes (the format allows any padding that keeps the data 64-byte aligned)."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    header = buf.getvalue()
    if pad_to is None or pad_to == len(header):
        return header
    if pad_to < len(header) or pad_to % 64:
        raise ValueError(f"cannot pad a {len(header)}-byte header to {pad_to}")
    text = header[10:].rstrip(b"\n").ljust(pad_to - 11) + b"\n"
    return header[:8] + struct.pack("<H", len(text)) + text


def load_engine_state(logra: "LoGra", state: dict) -> "Preconditioner":
    """Give `logra` the projections of a saved engine state (on its model's device; None: a side kept
    whole) and return the state's fitted preconditioner."""
    from engine import Preconditioner
    device = next(logra.model.parameters()).device
    for name, p in state["projections"].items():
        logra.projections[name] = tuple(None if t is None else t.to(device) for t in (p["in"], p["out"]))
    return Preconditioner.from_state_dict(state["preconditioner"])


class VectorFile:
    """Reads a float32 (N, dim) .npy, or an index folder's int8 compact vectors (VECTORS with SCALES
    and NORMS beside it) as float32 rows, in blocks with plain reads instead of a memory map, so the
    pages read do not stay in this process's resident set: memory stays at one block."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        header = np.load(self.path, mmap_mode="r")  # for its shape and data offset; unmapped below
        if header.dtype not in (np.float32, np.int8) or header.ndim != 2 or not header.flags.c_contiguous:
            raise IndexFormatError(f"{self.path} is not a float32 or int8 (N, dim) array")
        self.shape, self.offset, self.dtype = header.shape, header.offset, header.dtype
        del header
        self.scales = self.norms = None
        if self.dtype == np.int8:
            self.scales, self.norms = np.load(self.path.parent / SCALES), np.load(self.path.parent / NORMS)

    def read(self, start: int, stop: int) -> np.ndarray:
        dim = self.shape[1]
        stop = min(stop, self.shape[0])
        x = np.fromfile(self.path, dtype=self.dtype, count=(stop - start) * dim,
                        offset=self.offset + start * dim * self.dtype.itemsize).reshape(-1, dim)
        return x if self.scales is None else compact_vectors(x, self.scales[start:stop], self.norms[start:stop])

    def blocks(self, block: int) -> Iterable[tuple[int, np.ndarray]]:
        for s in range(0, self.shape[0], block):
            yield s, self.read(s, s + block)

    def rows(self, rows: np.ndarray, block: int) -> np.ndarray:
        """Rows (sorted) of the file, read block by block."""
        parts = []
        for s, x in self.blocks(block):
            sel = rows[(rows >= s) & (rows < s + len(x))]
            parts.append(x[sel - s])
        return np.concatenate(parts)


def compact_vectors(codes: np.ndarray, scales: np.ndarray, norms: np.ndarray) -> np.ndarray:
    """float32 vectors of int8 compact rows: the unit rows encode_rows stored, times their norms."""
    x = decode_rows(codes, scales, "int8", codes.shape[1])
    x *= np.asarray(norms, dtype=np.float32)[:, None]
    return x


class CompactRows:
    """The compact vectors of an opened index, memory-mapped (VECTORS; SCALES and NORMS in memory), read
    as float32 vectors whatever their storage: `rows[r]` for a row number, a slice or an array of rows
    gives a float32 array (int8 rows decoded: a new array; float32 rows: the map's own)."""

    def __init__(self, stored: np.ndarray, scales: np.ndarray | None, norms: np.ndarray):
        self.stored, self.scales, self.norms = stored, scales, norms
        self.storage = "float32" if scales is None else "int8"

    @classmethod
    def open(cls, root: str | Path, storage: str) -> "CompactRows":
        root = Path(root)
        stored = np.load(root / VECTORS, mmap_mode="r")
        if stored.ndim != 2 or stored.dtype != np.dtype({"float32": "<f4", "int8": "|i1"}[storage]):
            raise IndexFormatError(f"{root / VECTORS} holds {stored.dtype} {stored.shape}, not {storage} rows")
        return cls(stored, np.load(root / SCALES) if storage == "int8" else None, np.load(root / NORMS))

    @property
    def shape(self) -> tuple[int, int]:
        return self.stored.shape

    def __len__(self) -> int:
        return self.stored.shape[0]

    def sizes(self) -> dict[str, int]:
        """Rows each file holds (Index.open checks them against the manifest)."""
        return {"vectors": len(self), "norms": len(self.norms), **({"scales": len(self.scales)} if self.scales is not None else {})}

    def __getitem__(self, rows) -> np.ndarray:
        if self.scales is None:
            return self.stored[rows]
        if np.ndim(rows) == 0 and not isinstance(rows, slice):  # one row
            return self[np.array([rows])][0]
        return compact_vectors(self.stored[rows], self.scales[rows], self.norms[rows])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return np.asarray(self[:], dtype=dtype)


def write_faiss(root: str | Path, index_type: str = "auto", nlist: int | None = None, block: int | None = None,
                gpu: bool = True) -> dict:
    """The folder's FAISS files, both modes, from its vectors (ann.build_faiss; an exact flat index has
    none: it is built from the vectors when the index is opened); returns what was built."""
    root = Path(root)
    return build_faiss(VectorFile(root / VECTORS), {mode: faiss_path(root, mode) for mode in MODES}, index_type,
                       nlist=nlist, block=block, gpu=gpu)


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a reader sees the old file or the new one, never half of one


@dataclass
class Index:
    """A read-only, opened index folder."""

    root: Path
    manifest: Manifest
    state: dict
    vectors: "CompactRows | np.ndarray"  # (N, dim) float32 rows on indexing, memory-mapped
    norms: np.ndarray
    faiss: dict[str, faiss.Index]
    table: object
    row_of_id: dict[str, int]
    high_store: HighRows | None = None  # the high-fidelity stage's rows: read them with high_rows / high_blocks
    _keyword: bool | None = field(default=None, repr=False)  # whether the table has its full-text indexes (keyword_rows)

    @property
    def high_norms(self) -> np.ndarray | None:
        """The high-fidelity vectors' float32 norms (None without the stage)."""
        return None if self.high_store is None else self.high_store.norms

    def high_rows(self, rows: slice | range | np.ndarray | list[int]) -> np.ndarray:
        """The high-fidelity stage's float32 unit rows (a new array) of `rows`, in the order asked,
        whatever their storage (HighRows.rows)."""
        if self.high_store is None:
            raise ValueError(f"{self.root} has no high-fidelity stage")
        return self.high_store.rows(rows)

    def high_blocks(self, rows: range | None = None, block_rows: int = 8192) -> Iterable[tuple[range, np.ndarray]]:
        """(rows, float32 unit rows) of the high-fidelity stage over `rows` (default: all), a block at a time."""
        if self.high_store is None:
            raise ValueError(f"{self.root} has no high-fidelity stage")
        return self.high_store.blocks(rows, block_rows)

    @classmethod
    def open(cls, root: str | Path) -> "Index":
        root = Path(root)
        if not root.is_dir():
            raise IndexFormatError(f"{root} is not a folder")
        missing = [name for name in REQUIRED if not (root / name).exists()]
        if missing:
            raise IndexFormatError(f"{root} is not a complete index: missing {', '.join(missing)}")
        manifest = read_manifest(root)
        flat = manifest.faiss.type == "flat"
        needed = ([SCALES] if manifest.storage == "int8" else []) + ([] if flat else [faiss_path(root, m).name for m in MODES])
        missing = [name for name in needed if not (root / name).exists()]
        if missing:
            raise IndexFormatError(f"{root} is not a complete index: missing {', '.join(missing)}")
        try:
            state = torch.load(root / STATE, weights_only=True)
            vectors = CompactRows.open(root, manifest.storage)
            norms = vectors.norms
            indexes = (flat_indexes(vectors) if flat else
                       {mode: faiss.read_index(str(faiss_path(root, mode))) for mode in MODES})
            table = lancedb.connect(root).open_table(TABLE)
            ids = table.search().select(["row", "id"]).limit(None).to_arrow()
            high = manifest.high
            high_store = HighRows.open(root, high.storage, high.dim) if high else None
        except Exception as e:  # any unreadable file means a corrupt index, said plainly
            raise IndexFormatError(f"{root} is corrupt: {type(e).__name__}: {e}") from e
        n = manifest.n_documents
        sizes = {**vectors.sizes(), "table": ids.num_rows,
                 **{f"faiss-{m}": ix.ntotal for m, ix in indexes.items()}}
        if high:
            sizes.update(high_store.sizes())
        if any(v != n for v in sizes.values()) or vectors.shape[1] != manifest.dim:
            raise IndexFormatError(f"{root} is corrupt: manifest says {n} documents of dim {manifest.dim}, files hold {sizes}")
        row_of_id = dict(zip(ids.column("id").to_pylist(), ids.column("row").to_pylist()))
        return cls(root, manifest, state, vectors, norms, indexes, table, row_of_id, high_store)

    def __len__(self) -> int:
        return self.vectors.shape[0]

    def engine(self, model, name: str | None = None) -> tuple["LoGra", "Preconditioner"]:
        """The LoGra projector and fitted preconditioner this index was built with, for `model`
        (called `name` in errors), which must be the model that built it: same weights, same layers.
        The stored projections are used, whatever this torch's random generator would make."""
        from engine import model_fingerprint
        built_by = self.manifest.model
        name = name or built_by.name_or_path
        fingerprint = model_fingerprint(model)
        if fingerprint != built_by.fingerprint:
            raise ModelMismatchError(f"model {name!r} (fingerprint {fingerprint}) is not the model that built "
                                     f"{self.root} ({built_by.name_or_path!r}, fingerprint {built_by.fingerprint})")
        return self._engine(model, name, self.manifest.layers, self.state)

    def high_engine(self, model, name: str | None = None) -> tuple["LoGra", "Preconditioner"] | None:
        """The high-fidelity stage's projector and preconditioner (None for an index built without
        one); `model` must already have passed `engine`'s check."""
        high = self.manifest.high
        if not high:
            return None
        return self._engine(model, name or self.manifest.model.name_or_path, high.layers, self.state["high"])

    def _engine(self, model, name: str, layers: list[LayerInfo], state: dict) -> tuple["LoGra", "Preconditioner"]:
        from engine import LoGra, LoGraConfig
        m = self.manifest
        shapes = {l.name: (l.r_out, l.r_in) for l in layers}
        try:
            logra = LoGra(model, LoGraConfig(seed=m.seed, max_tokens=m.max_tokens), shapes=shapes)
        except ValueError as e:
            raise ModelMismatchError(f"model {name!r} does not have the layers recorded in {self.root}: {e}") from None
        if [(l.name, l.in_features, l.out_features) for l in logra.layers] != [
                (l.name, l.in_features, l.out_features) for l in layers]:
            raise ModelMismatchError(f"model {name!r} does not have the layers recorded in {self.root}")
        return logra, load_engine_state(logra, state)

    def keyword_rows(self, query: str, n: int) -> np.ndarray:
        """Rows of the (at most) n best documents for `query` by BM25 over their text and prompt (LanceDB's
        full-text indexes), best first; none for an index written before it had them, or a query with no
        indexed term."""
        if n < 1 or not query.strip() or not self._keyword_indexed():
            return np.empty(0, np.int64)
        found = (self.table.search(query, query_type="fts", fts_columns=list(KEYWORD_COLUMNS))
                 .select(["row", "_score"]).limit(n).to_arrow())
        return found.column("row").to_numpy().astype(np.int64)

    def _keyword_indexed(self) -> bool:
        if self._keyword is None:
            self._keyword = {c for i in self.table.list_indices() if str(i.index_type) == "FTS" for c in i.columns} \
                >= set(KEYWORD_COLUMNS)
        return self._keyword

    def _metadata(self) -> Iterable[tuple[int, dict]]:
        """(row, decoded metadata) of every document: one scan of the row and metadata columns."""
        for batch in self.table.search().select(["row", "metadata"]).limit(None).to_batches():
            for row, meta in zip(batch.column("row").to_pylist(), batch.column("metadata").to_pylist()):
                yield row, json.loads(meta)

    def metadata_fields(self) -> set[str]:
        """Every metadata field some document has."""
        return {f for _, meta in self._metadata() for f in meta}

    def rows_by_value(self, field: str) -> dict[str, np.ndarray]:
        """For one metadata field: each value (as JSON text) -> the rows holding it, ascending;
        documents without the field are left out."""
        groups: dict[str, list[int]] = {}
        for row, meta in self._metadata():
            value = meta.get(field, _MISSING)
            if value is not _MISSING:
                groups.setdefault(json.dumps(value, sort_keys=True), []).append(row)
        return {v: np.sort(np.asarray(r, dtype=np.int64)) for v, r in groups.items()}

    @property
    def ids(self) -> list[str]:
        """Every document's id, by row."""
        out = [""] * len(self)
        for doc_id, row in self.row_of_id.items():
            out[row] = doc_id
        return out

    def groups(self, fields: list[str]) -> tuple[list[dict], np.ndarray]:
        """Documents grouped by their metadata values of `fields`: the groups ({field: value}, a field a
        document lacks left out of its dict: those documents form their own group) and each row's group
        number."""
        keys: dict[str, int] = {}
        groups: list[dict] = []
        codes = np.zeros(len(self), dtype=np.int64)
        for row, meta in self._metadata():
            group = {f: meta[f] for f in fields if f in meta}
            key = json.dumps(group, sort_keys=True)
            if key not in keys:
                keys[key] = len(groups)
                groups.append(group)
            codes[row] = keys[key]
        return groups, codes

    def documents(self, rows: list[int]) -> list[dict]:
        """Documents by row, in the order asked, metadata decoded."""
        if not rows:
            return []
        by_row = {r["row"]: r for r in self.table.take_offsets(list(rows)).to_list()}
        out = []
        for row in rows:
            doc = dict(by_row[row])
            doc["metadata"] = json.loads(doc["metadata"])
            out.append(doc)
        return out
