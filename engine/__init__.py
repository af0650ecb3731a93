"""Model-side math of logra-search: tracked layers, LoGra projected gradients, preconditioners,
document and query vectors. No I/O beyond loading a model."""
from .encoding import (Encoded, TextFormat, check_messages, collate, encode, length_bucketed_batches, scored_positions,
                       token_texts)
from .layers import TrackedLayer, find_tracked_layers
from .logra import (LoGra, LoGraConfig, ProjectedGradients, joint_gradients, per_example_loss, projection_matrix,
                    sketch_matrix)
from .model import load_model, model_fingerprint, prepare_model, resolve_device
from .preconditioner import KINDS as PRECONDITIONERS, Preconditioner
from .budget import allocate
from .vectors import (MAX_TOKENS_SCORED, TokenVectors, encode_pairs, fit_preconditioner, pair_vector_batches, pair_vectors,
                      projected_gradients, query_vectors, token_vectors)

__all__ = [
    "Encoded", "TextFormat", "check_messages", "collate", "encode", "length_bucketed_batches", "TrackedLayer", "find_tracked_layers", "LoGra", "LoGraConfig",
    "ProjectedGradients", "joint_gradients", "per_example_loss", "projection_matrix", "sketch_matrix", "load_model", "model_fingerprint",
    "prepare_model", "resolve_device", "PRECONDITIONERS", "Preconditioner", "encode_pairs",
    "projected_gradients", "query_vectors", "scored_positions", "token_texts", "MAX_TOKENS_SCORED", "TokenVectors",
    "token_vectors", "pair_vectors", "pair_vector_batches", "allocate", "fit_preconditioner",
]
