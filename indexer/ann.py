"""Approximate search: which FAISS index an index folder gets (the index-type policy, with the
measurements behind it) and how it is built. Knows no file names: indexer.store says where the
vectors and the FAISS files are; indexer.query.ranking turns FAISS candidates into exact answers."""
from __future__ import annotations

import warnings
from pathlib import Path

import faiss
import numpy as np

MODES = ("influence", "cosine")  # one FAISS index per mode: raw inner products, and over unit rows
INDEX_TYPES = ("auto", "flat", "ivf", "ivf-flat", "ivf-sq8", "ivf-pq")  # "ivf" is "ivf-flat"
# index_type "auto": exact (flat) while the float32 vectors fit FLAT_UP_TO_BYTES (or below FLAT_BELOW
# documents), COMPRESSED_TYPE above. Preconditioned gradients are nearly isotropic, which IVF handles
# poorly: recall is set by the share of lists probed, whatever the quantizer (benchmarks/large_index.py;
# at 100k x 4073 of the demo's vectors, cosine recall@10 0.73 / 0.86 / 0.94 at 1/8, 1/4, 1/2 of the
# lists for IVF-flat, IVF-SQ8 and IVF-PQ alike). What differs is the cost of a probed list there, one
# thread: IVF-PQ 19 / 23 / 31 ms, IVF-flat 20 / 38 ms (1/8, 1/4), IVF-SQ8 61 / 116 ms; flat scan 118 ms
# (30 ms at 256 MiB).
FLAT_BELOW = 4096
FLAT_UP_TO_BYTES = 256 << 20
COMPRESSED_TYPE = "ivf-pq"
PQ_DIMS_PER_CODE = 8  # IVF-PQ: one byte per this many dimensions (vectors zero-padded to a multiple)
# Quantized scores only propose candidates; the exact rerank keeps results exact when the true
# top k are among them, so compressed types ask FAISS for this many times more (api.search).
# Measured (benchmarks/large_index.py, 1M x 512): SQ8 lost nothing even at 1, but heavy-tailed norms
# stretch its 8-bit ranges (at 2 the stress test in tests/test_indexer.py misses); PQ (64 B) reached
# 0.986 at 4 and 0.9965 at 16; at 100k x 4073 (the demo's, 510 B) 0.923 / 0.928 / 0.928 (cosine) at
# 4 / 8 / 16, in 19 / 22 / 32 ms: the exact rerank of the extra candidates is what costs.
RERANK_FACTOR = {"flat": 1, "ivf-flat": 1, "ivf-sq8": 4, "ivf-pq": 8}
TRAIN_POINTS_PER_LIST = 64  # k-means sample per IVF list
MIN_POINTS_PER_LIST = 39  # FAISS warns when k-means gets fewer training points per list
TRAIN_BYTES = 512 << 20  # ...and at most this much float32 sample, so training memory is bounded
BLOCK_BYTES = 128 << 20  # vectors are read and added to an index in blocks of this size


def unit_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def resolve_index_type(index_type: str, n: int, dim: int) -> str:
    """The concrete FAISS index type for `index_type` over n vectors of `dim` floats."""
    if index_type not in INDEX_TYPES:
        raise ValueError(f"index_type must be one of {INDEX_TYPES}, got {index_type!r}")
    if index_type == "ivf":
        return "ivf-flat"
    if index_type != "auto":
        return index_type
    return "flat" if n < FLAT_BELOW or n * dim * 4 <= FLAT_UP_TO_BYTES else COMPRESSED_TYPE


def default_nlist(n: int) -> int:
    # 2 sqrt(n) lists, not the usual 4-16 sqrt(n): k-means and assignment cost grow with nlist and
    # run on one CPU core in the tested setup; the exact rerank makes up for coarser lists.
    return max(1, int(min(2 * np.sqrt(n), n // MIN_POINTS_PER_LIST)))


def padded_dim(index_type: str, dim: int) -> int:
    """The FAISS index's dimension: IVF-PQ's sub-quantizers need a multiple of PQ_DIMS_PER_CODE
    (vectors and queries are zero-padded: inner products unchanged); the others take dim as is."""
    return dim + (-dim) % PQ_DIMS_PER_CODE if index_type == "ivf-pq" else dim


def pad_to(x: np.ndarray, dim: int) -> np.ndarray:
    return x if x.shape[1] == dim else np.pad(x, ((0, 0), (0, dim - x.shape[1])))


def _gpu_resources():
    """faiss-gpu with a visible GPU: resources to train and fill IVF indexes there, else None."""
    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        return faiss.StandardGpuResources()
    return None


def _prepare(mode: str, d: int):
    """What a mode's FAISS index holds of a block of vectors: the rows (influence) or unit rows (cosine), padded to d."""
    return (lambda x: pad_to(x, d)) if mode == "influence" else (lambda x: pad_to(unit_rows(x), d))


def flat_indexes(vectors, block: int | None = None) -> dict[str, faiss.Index]:
    """The exact (flat) FAISS index of each mode, built in memory from `vectors` (float32 rows by slice:
    store.CompactRows). A flat index is the vectors themselves (FLAT_UP_TO_BYTES of float32 at most,
    added in a second or so), so no file repeats them on disk: it is built when an index is opened."""
    n, dim = vectors.shape
    block = block or max(1, BLOCK_BYTES // (4 * dim))
    out = {}
    for mode in MODES:
        index, prep = faiss.IndexFlatIP(dim), _prepare(mode, dim)
        for s in range(0, n, block):
            index.add(prep(np.asarray(vectors[s : s + block], dtype=np.float32)))
        out[mode] = index
    return out


def build_faiss(vectors, paths: dict[str, Path], index_type: str = "auto", nlist: int | None = None,
                block: int | None = None, gpu: bool = True) -> dict:
    """Write the FAISS index of each mode to paths[mode] from `vectors` (a store.VectorFile: `shape`,
    `rows`, `blocks`) and return what was built (type, nlist, nprobe, ..., rerank_factor) for the
    manifest; a flat index writes nothing (flat_indexes). Training uses a bounded sample and vectors
    are added a block at a time, so memory is the index itself plus one block. With faiss-gpu and a
    GPU (and `gpu`), IVF indexes are trained and filled on GPU 0."""
    vf = vectors
    n, dim = vf.shape
    block = block or max(1, BLOCK_BYTES // (4 * dim))
    kind = resolve_index_type(index_type, n, dim)
    if kind == "flat":
        return {"type": kind, "rerank_factor": RERANK_FACTOR[kind], "device": "cpu"}
    res = _gpu_resources() if gpu else None
    d = padded_dim(kind, dim)
    for mode in MODES:
        prep = _prepare(mode, d)
        info = {"type": kind, "rerank_factor": RERANK_FACTOR[kind]}
        k = nlist or default_nlist(n)
        quantizer = faiss.IndexFlatIP(d)
        n_train = min(n, TRAIN_POINTS_PER_LIST * k, max(MIN_POINTS_PER_LIST * k, TRAIN_BYTES // (4 * dim)))
        sample = np.sort(np.random.default_rng(0).choice(n, size=n_train, replace=False))
        if kind == "ivf-flat":
            index = faiss.IndexIVFFlat(quantizer, d, k, faiss.METRIC_INNER_PRODUCT)
        elif kind == "ivf-sq8":
            index = faiss.IndexIVFScalarQuantizer(quantizer, d, k, faiss.ScalarQuantizer.QT_8bit,
                                                  faiss.METRIC_INNER_PRODUCT)
        else:  # 8-bit codes need 256 training points per sub-quantizer; tiny corpora get fewer bits
            m, nbits = d // PQ_DIMS_PER_CODE, min(8, int(np.log2(n_train)))
            index = faiss.IndexIVFPQ(quantizer, d, k, m, nbits, faiss.METRIC_INNER_PRODUCT)
            info.update(m=m, nbits=nbits, padded_dim=d)
        info.update(nlist=k, n_train=n_train)
        work, on_gpu = index, False
        if res is not None:
            try:
                work, on_gpu = faiss.index_cpu_to_gpu(res, 0, index), True
            except RuntimeError as e:  # e.g. a PQ code size the GPU kernels lack: build on the CPU
                warnings.warn(f"faiss-gpu cannot build {kind} here ({e}); building on the CPU")
        work.train(prep(vf.rows(sample, block)))
        for _, x in vf.blocks(block):
            work.add(prep(x))
        index = faiss.index_gpu_to_cpu(work) if on_gpu else work
        del work
        # Candidates are reranked exactly; recall is what costs: half the lists (see FLAT_BELOW).
        index.nprobe = info["nprobe"] = min(index.nlist, max(8, index.nlist // 2))
        info["device"] = "gpu" if on_gpu else "cpu"
        faiss.write_index(index, str(paths[mode]))
        del index
    return info
