"""Attribution quality benchmark (LDS, brittleness, self-retrieval) for logra-search.

`python -m benchmarks.quality generate [--bench NAME]` rebuilds the ground truths (base model,
fine-tune set, subset retrains, brittleness retrains) into benchmarks/quality/ground_truth/NAME/, one
per spec in specs.py (gpt2-stdlib: GPT-2 on stdlib docstrings; llama-pkgdocs: Llama on third-party
package docstrings);
`python -m benchmarks.quality run` scores every method against them and writes
benchmarks/results/quality.json and benchmarks/results/quality.md.
"""
