"""The index folder format: the one module that knows its files. The indexer writes through
`IndexWriter`; the API (and anyone else) reads through `Index`.

    DIR/manifest.json          what was indexed, with which model, layers, ranks and preconditioner
    DIR/state.pt               projection matrices and preconditioner state (torch, weights_only)
    DIR/vectors.npy            float32 (N, dim) preconditioned LoGra vectors, exact, memory-mapped
    DIR/norms.npy              float32 (N,) their norms
    DIR/faiss-influence.index  FAISS inner-product index over the vectors
    DIR/faiss-cosine.index     FAISS inner-product index over the unit-normalised vectors
    DIR/documents.lance        LanceDB table `documents`: row, id, text, prompt, metadata (JSON), ...

Row i of the table is row i of vectors.npy and id i of both FAISS indexes. An index is built in a
sibling temporary folder and renamed into place, so DIR is never half-written.
"""
from __future__ import annotations

import io
import json
import os
import struct
import shutil
import fcntl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import faiss

from pydantic import ValidationError

from .ann import MODES, build_faiss, unit_rows  # noqa: F401  (unit_rows: the writers' and readers' one definition)
from .manifest import FORMAT_VERSION, LayerInfo, Manifest

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
# The high-fidelity stage's vectors (indexes built with it): float16 unit rows, their float32 norms apart
# (a whitened gradient's entries span more than float16's range; a unit row's do not).
HIGH_VECTORS = "high.npy"
HIGH_NORMS = "high-norms.npy"
NORMS = "norms.npy"
TABLE = "documents"
REQUIRED = (MANIFEST, STATE, VECTORS, NORMS, "faiss-influence.index", "faiss-cosine.index", f"{TABLE}.lance")
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
    if data.get("format_version") != FORMAT_VERSION:
        raise IndexFormatError(f"{root} has index format {data.get('format_version')}; this version reads {FORMAT_VERSION}")
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
        lancedb.connect(self.tmp).create_table(TABLE, data=pa.RecordBatchReader.from_batches(DOCUMENT_SCHEMA, batches()),
                                               mode="overwrite")

    # -- pass 2: preconditioned vectors and FAISS ----------------------------------------------
    def write_vectors(self, vectors: Iterable[np.ndarray], dim: int, block_rows: int = 65536) -> None:
        """Preconditioned vectors of the new documents, after the base index's own (if any). Written
        block by block through a file, not a memory map: mapped pages would count in the indexer's
        memory until the end, so its peak would grow with the corpus."""
        total = self.row_offset + self.n_rows
        norms = np.zeros(total, dtype=np.float32)
        start = 0
        with open(self.tmp / VECTORS, "wb") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (total, dim)})
            if self.base is not None:
                for _, block in VectorFile(self.base.root / VECTORS).blocks(block_rows):
                    f.write(block.tobytes())
                norms[: self.row_offset] = self.base.norms
                start = self.row_offset
            for block in vectors:
                block = np.ascontiguousarray(block, dtype=np.float32)
                if start + len(block) > total:
                    raise RuntimeError(f"more vectors than the {total} documents")
                f.write(block.tobytes())
                norms[start : start + len(block)] = np.linalg.norm(block, axis=1)
                start += len(block)
        if start != total:
            raise RuntimeError(f"wrote {start} vectors for {total} documents")
        np.save(self.tmp / NORMS, norms)

    # -- the high-fidelity stage: fitted state, then its vectors ---------------------------------
    @property
    def high_state(self) -> dict | None:
        """The high-fidelity stage's fitted engine state saved by this build before it was killed."""
        path = self.tmp / "high-state.pt"
        return torch.load(path, weights_only=True) if path.is_file() else None

    def save_high_state(self, state: dict) -> None:
        _atomic_torch_save(state, self.tmp / "high-state.pt")

    def high_vectors(self, dim: int) -> "HighVectorWriter":
        return HighVectorWriter(self.tmp, dim, self.base)

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
        for path in (self.tmp / "high-state.pt", self.tmp / HighVectorWriter.PROGRESS, self.tmp / HighVectorWriter.NORMS):
            path.unlink(missing_ok=True)
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


class HighVectorWriter:
    """Writes HIGH_VECTORS and HIGH_NORMS into a build folder, rows appended in order, a block at a
    time (plain writes, not a memory map, so the indexer's memory does not grow with the corpus); the
    number of rows need not be known ahead (the gradient pass streams). After each `checkpoint` the
    file is flushed and PROGRESS records the rows written: a killed build resumes after them (`rows`).
    An append's writer starts with the base index's rows."""
    PROGRESS = "high-progress.json"
    NORMS = "high-norms.partial.npy"  # the norms written so far; kept until commit, so a closed writer resumes
    # room for the .npy header of any row count; the final header is padded to it (`close`)
    _RESERVED_SHAPE = (10**15, 0)

    def __init__(self, folder: Path, dim: int, base: "Index | None" = None):
        self.folder, self.dim = folder, dim
        self.offset = len(_npy_header((self._RESERVED_SHAPE[0], dim)))
        progress = folder / self.PROGRESS
        done = json.loads(progress.read_text()) if progress.is_file() else {}
        if done.get("dim") == dim and done.get("offset") == self.offset:
            self.rows, self.norms = done["rows"], [np.load(folder / self.NORMS)]
            self._file = open(folder / HIGH_VECTORS, "r+b")
            return
        self.rows, self.norms = 0, []
        self._file = open(folder / HIGH_VECTORS, "w+b")
        self._file.write(_npy_header((self._RESERVED_SHAPE[0], dim)))
        if base is not None:
            if base.high_vectors is None or base.high_vectors.shape[1] != dim:
                raise IndexFormatError(f"{base.root} has no high-fidelity vectors of dim {dim}")
            for s in range(0, len(base), 8192):
                self.add_unit(np.asarray(base.high_vectors[s : s + 8192]), base.high_norms[s : s + 8192])
            self.checkpoint()

    @staticmethod
    def unit(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """What is stored of float vectors: float16 unit rows (their entries fit float16; a whitened
        gradient's need not) and float32 norms."""
        norms = np.linalg.norm(vectors, axis=1)
        unit = vectors / np.where(norms > 0, norms, 1.0)[:, None]
        return unit.astype(np.float16), norms.astype(np.float32)

    def add(self, vectors: np.ndarray) -> None:
        """The next rows' vectors (float32 or float64)."""
        self.add_unit(*self.unit(vectors))

    def add_unit(self, unit: np.ndarray, norms: np.ndarray) -> None:
        """The next rows, already as `unit` returns them."""
        self._file.seek(self.offset + self.rows * self.dim * 2)
        self._file.write(np.ascontiguousarray(unit, dtype="<f2").tobytes())
        self.norms.append(np.asarray(norms, dtype=np.float32))
        self.rows += len(unit)

    def rewind(self, rows: int) -> None:
        """Keep only the first `rows` rows (those a resumed gradient pass has checkpointed)."""
        if rows > self.rows:
            raise IndexFormatError(f"the partial build's high-fidelity vectors stop at row {self.rows}, before its "
                                   f"checkpoint at {rows}; rebuild with --overwrite")
        self.norms = [np.concatenate(self.norms)[:rows]] if self.norms else []
        self.rows = rows

    def checkpoint(self) -> None:
        """Make the rows added so far survive a kill."""
        self._file.flush()
        os.fsync(self._file.fileno())
        norms = np.concatenate(self.norms) if self.norms else np.zeros(0, np.float32)
        self.norms = [norms]
        tmp = self.folder / "high-norms.partial.tmp.npy"
        np.save(tmp, norms)
        os.replace(tmp, self.folder / self.NORMS)
        tmp = self.folder / (self.PROGRESS + ".tmp")
        tmp.write_text(json.dumps({"dim": self.dim, "rows": self.rows, "offset": self.offset}))
        os.replace(tmp, self.folder / self.PROGRESS)

    def close(self, total: int) -> None:
        """All `total` rows written: the final header and norms file (the progress stays until the
        index is committed: a build that fails after this resumes with the rows complete)."""
        if self.rows != total:
            raise RuntimeError(f"wrote {self.rows} high-fidelity vectors for {total} documents")
        self._file.truncate(self.offset + total * self.dim * 2)
        self._file.seek(0)
        self._file.write(_npy_header((total, self.dim), pad_to=self.offset))
        self._file.close()
        np.save(self.folder / HIGH_NORMS, np.concatenate(self.norms) if self.norms else np.zeros(0, np.float32))


def _npy_header(shape: tuple[int, int], pad_to: int | None = None) -> bytes:
    """The .npy (version 1.0) header of a float16 array of `shape`, padded with spaces to `pad_to`
    bytes (the format allows any padding that keeps the data 64-byte aligned)."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f2", "fortran_order": False, "shape": shape})
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
    """Reads a float32 (N, dim) .npy in blocks with plain reads instead of a memory map, so the
    pages read do not stay in this process's resident set: memory stays at one block."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        header = np.load(self.path, mmap_mode="r")  # for its shape and data offset; unmapped below
        if header.dtype != np.float32 or header.ndim != 2 or not header.flags.c_contiguous:
            raise IndexFormatError(f"{self.path} is not a float32 (N, dim) array")
        self.shape, self.offset = header.shape, header.offset
        del header

    def read(self, start: int, stop: int) -> np.ndarray:
        dim = self.shape[1]
        count = (min(stop, self.shape[0]) - start) * dim
        return np.fromfile(self.path, dtype=np.float32, count=count, offset=self.offset + start * dim * 4).reshape(-1, dim)

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


def write_faiss(root: str | Path, index_type: str = "auto", nlist: int | None = None, block: int | None = None,
                gpu: bool = True) -> dict:
    """The folder's FAISS files, both modes, from its vectors (ann.build_faiss); returns what was built."""
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
    vectors: np.ndarray  # memory-mapped (N, dim)
    norms: np.ndarray
    faiss: dict[str, faiss.Index]
    table: object
    row_of_id: dict[str, int]
    high_vectors: np.ndarray | None = None  # memory-mapped (N, high dim) float16 unit rows
    high_norms: np.ndarray | None = None

    @classmethod
    def open(cls, root: str | Path) -> "Index":
        root = Path(root)
        if not root.is_dir():
            raise IndexFormatError(f"{root} is not a folder")
        missing = [name for name in REQUIRED if not (root / name).exists()]
        if missing:
            raise IndexFormatError(f"{root} is not a complete index: missing {', '.join(missing)}")
        manifest = read_manifest(root)
        try:
            state = torch.load(root / STATE, weights_only=True)
            vectors = np.load(root / VECTORS, mmap_mode="r")
            norms = np.load(root / NORMS)
            indexes = {mode: faiss.read_index(str(faiss_path(root, mode))) for mode in MODES}
            table = lancedb.connect(root).open_table(TABLE)
            ids = table.search().select(["row", "id"]).limit(None).to_arrow()
            high = manifest.high
            high_vectors = np.load(root / HIGH_VECTORS, mmap_mode="r") if high else None
            high_norms = np.load(root / HIGH_NORMS) if high else None
        except Exception as e:  # any unreadable file means a corrupt index, said plainly
            raise IndexFormatError(f"{root} is corrupt: {type(e).__name__}: {e}") from e
        n = manifest.n_documents
        sizes = {"vectors": vectors.shape[0], "norms": norms.shape[0], "table": ids.num_rows,
                 **{f"faiss-{m}": ix.ntotal for m, ix in indexes.items()}}
        if high:
            sizes.update(high=high_vectors.shape[0], high_norms=high_norms.shape[0])
        if (any(v != n for v in sizes.values()) or vectors.shape[1] != manifest.dim
                or (high and high_vectors.shape[1] != high.dim)):
            raise IndexFormatError(f"{root} is corrupt: manifest says {n} documents of dim {manifest.dim}, files hold {sizes}")
        row_of_id = dict(zip(ids.column("id").to_pylist(), ids.column("row").to_pylist()))
        return cls(root, manifest, state, vectors, norms, indexes, table, row_of_id, high_vectors, high_norms)

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
