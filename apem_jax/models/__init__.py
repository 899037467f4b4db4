"""Models: field embedding, DeepAuto Group Transformer, Pattern Selector, APEM, baselines."""

from apem_jax.models.apem import APEM
from apem_jax.models.baselines import AITM, ESMM, MMoE, PLE, SharedBottom, SingleTask
from apem_jax.models.defaults import default_model_config
from apem_jax.models.embedding import FieldEmbedding, table_offsets
from apem_jax.models.group_transformer import (DAGTOutput, DeepAutoGroupTransformer,
                                               GroupTransformerBlock, SqueezeExcitation)
from apem_jax.models.layers import MLP, BatchedMLP
from apem_jax.models.pattern_selector import PatternSelector
from apem_jax.models.registry import MODELS, build_model, register_model, resolve_config

__all__ = [
    "APEM", "AITM", "ESMM", "MMoE", "PLE", "SharedBottom", "SingleTask", "default_model_config",
    "FieldEmbedding", "table_offsets", "DAGTOutput", "DeepAutoGroupTransformer",
    "GroupTransformerBlock", "SqueezeExcitation", "MLP", "BatchedMLP", "PatternSelector", "MODELS",
    "build_model", "register_model", "resolve_config",
]
