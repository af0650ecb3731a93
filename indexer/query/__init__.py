"""Query time, apart from the build: an index opened with its model (`opened`), ranking (`ranking`: the
API's /attribute and `indexer attribute`), bulk attribution (`attribute`: `python -m indexer attribute`)
and valuation (`value`: `python -m indexer value`, POST /value)."""
