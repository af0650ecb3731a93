"""A query's vectors of both stages from one forward and backward pass (Opened.vectors, through
indexer.query.stage.stage_vectors) equal each stage's own pass: the compact ones engine.query_vectors
gives, the high-fidelity ones engine.pair_vectors gives in the preconditioner's eigenbasis (the basis
the index stores them in); on both model families, for queries of unequal lengths in one batch."""
from __future__ import annotations

import numpy as np
import pytest

from engine import pair_vectors, query_vectors
from indexer.query import open_index

from .support import build_corpus_index, synthetic_corpus

PAIRS = [("", "river stone cloud lamp orbit signal garden"), ("winter engine\n", "paper violet"),
         ("a longer prompt: falcon marble thunder velvet lantern meadow\n", "cipher anchor quartz ember willow canyon"),
         ("", "socket prism")]


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def opened(request, tmp_path_factory):
    model_dir = request.getfixturevalue(f"{request.param}_dir")
    index_dir = build_corpus_index(tmp_path_factory.mktemp(f"one-pass-{request.param}"), model_dir,
                                   synthetic_corpus(30, seed=5))
    return open_index(str(index_dir))


def assert_close(got: np.ndarray, want: np.ndarray) -> None:
    """Equal up to float32 rounding of another batch shape (BLAS sums in another order), relative to
    each vector's largest entry: a stage mixed up, a basis missed or a batch dependence would differ
    by the order of the entries themselves."""
    assert got.shape == want.shape and got.dtype == np.float32
    scale = np.abs(want).max(axis=1, keepdims=True)
    assert (np.abs(got - want) <= 1e-5 * scale).all(), float((np.abs(got - want) / scale).max())


def test_one_pass_gives_each_stages_own_pass_vectors(opened):
    assert opened.high is not None
    (fast, high), encoded = opened.vectors([opened.fast, opened.high], PAIRS)
    own_fast, own_encoded = query_vectors(opened.fast.logra, opened.fast.pre, opened.tokenizer, PAIRS)
    own_high = pair_vectors(opened.high.logra, opened.high.pre, opened.tokenizer, PAIRS, eigenbasis=True)
    assert [e.input_ids for e in encoded] == [e.input_ids for e in own_encoded]
    assert_close(fast, own_fast.numpy())
    assert_close(high, own_high.numpy())


def test_one_stage_alone_is_the_same_vectors(opened):
    """A fast query computes the compact stage alone, a valuation at high the high stage alone: the
    same vectors as with both."""
    (fast, high), _ = opened.vectors([opened.fast, opened.high], PAIRS)
    (fast_alone,), _ = opened.vectors([opened.fast], PAIRS)
    (high_alone,), _ = opened.vectors([opened.high], PAIRS)
    assert_close(fast_alone, fast)
    assert_close(high_alone, high)
