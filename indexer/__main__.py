import os

# libgomp (torch's and FAISS's OpenMP) keeps its idle worker threads spinning for ~300k iterations
# after each parallel region. The index pass runs many small ops, so under another process's CPU
# load those spins take the time slices the working threads need: a build ran 7.7x slower loaded
# (a training epoch 5x). A short spin keeps the quiet speed and makes a loaded build ~3x faster
# (benchmarks/indexing.py, "contention"). libgomp reads it when torch loads: set before any import.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

import sys  # noqa: E402

from .cli import main  # noqa: E402

sys.exit(main())
