"""Attribution quality benchmark (LDS, brittleness, self-retrieval) for logra-search.

`python -m benchmarks.quality generate` rebuilds the ground truth (base model, fine-tune set,
subset retrains, brittleness retrains) into benchmarks/quality/ground_truth/;
`python -m benchmarks.quality run` scores every method against it and writes
benchmarks/results/quality.json and benchmarks/results/quality.md.
"""
