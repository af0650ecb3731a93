"""Query time, apart from the build: an index opened with its model and stages (`opened`: `Opened`,
`open_index`), what a stage is (`stage`: `Stage`, its stored rows and scoring rule, and query vectors
of several stages from one pass), ranking (`ranking`: the API's /attribute and `indexer attribute`),
bulk attribution (`attribute`: `python -m indexer attribute`) and valuation (`value`: `python -m
indexer value`, POST /value)."""
from .opened import NOTHING_TO_SCORE, Opened, QueryError, open_index, query_matrix, query_records
from .ranking import DIRECTIONS, HIGH_DEPTH, Hit, rank
from .stage import MODES, STAGES, Stage, stage_vectors

__all__ = ["DIRECTIONS", "HIGH_DEPTH", "Hit", "MODES", "NOTHING_TO_SCORE", "Opened", "QueryError", "STAGES", "Stage",
           "open_index", "query_matrix", "query_records", "rank", "stage_vectors"]
