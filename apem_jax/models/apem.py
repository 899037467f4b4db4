"""APEM: Adaptive Pattern Extraction Multi-task learning.

Tao, Ha, Ma, Cheng, Lin, Guo, "Adaptive Pattern Extraction Multi-Task Learning for Multi-Step
Conversion Estimations", arXiv 2301.02494.

What is the paper's (its abstract; DESIGN.md section 1):

* the model learns interactions between the input feature fields and extracts task-specific
  information from them;
* a DeepAuto Group Transformer enhances feature expressivity with a *modified set attention* and a
  *Squeeze-and-Excitation* operation;
* an explicit Pattern Selector learns a selective representation per task through *adaptive
  task-indicator vectors*;
* the target is multi-step conversion (tasks with sequential dependence).

What is **our reconstruction** (DESIGN.md section 2; the paper gives no equations): everything
else: the per-field embedding; competitive grouping (softmax over groups, renormalised over
fields) as the "modification" of set attention; seeds, heads, LN/FFN placement, broadcast back;
SE over fields with a grouped mean/max squeeze (FiBiNet++); the pattern bank of field + group
tokens; indicators ``tau_t + g_t(mean_f E_L)``; dot-product selection with optional top-k; towers on
``[h_t ; E_L flattened]`` (``tower_input='pooled'``: ``mean_f E_L``). Funnel chaining of the
logits is done by the losses module, not here.
Candidate designs, each a switch (docs/apem_designs.md): ``pair_patterns`` adds the pairwise
interactions of the group tokens to the pattern bank; ``task_embeddings`` gives each task's tower
embeddings of its own for the small-vocabulary fields (STEM).

Pipeline: FieldEmbedding -> DeepAutoGroupTransformer -> PatternSelector -> per-task towers.
"""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from apem_jax.models import layers
from apem_jax.models.embedding import FieldEmbedding
from apem_jax.models.group_transformer import (GROUPINGS, SE_GATES, SE_SQUEEZES,
                                               DeepAutoGroupTransformer)
from apem_jax.models.layers import BatchedMLP, get_dtype
from apem_jax.models.gated_selector import GatedPatternSelector
from apem_jax.models.pattern_selector import PatternSelector
from apem_jax.schema import Schema


# What each task tower reads besides its selected pattern h_t: the mean of the field tokens
# ('pooled', [B, d]) or all field tokens flattened ('flat', [B, F*d]).
TOWER_INPUTS = ("pooled", "flat")
# How the Pattern Selector hands patterns to the towers: one softmax average per task
# ('softmax', ``APEM.selector``) or every pattern scaled by a per-task gate ('gates',
# gated_selector.py, PEPNet-style).
SELECTIONS = ("softmax", "gates")


class APEM(nn.Module):
  """APEM model. Keys of the config are the attributes below (see ``defaults.py``).

  ``__call__(batch, train)`` returns:
    * ``logits``: float32 [B, T], one per task in schema order;
    * ``pattern_weights``: float32 [B, T, F+G(+P)], the Pattern Selector's alpha
      (``selection='gates'``: each pattern's gate / 2, in [0, 1]); with ``pair_patterns`` the
      ``P = G(G-1)/2`` pair patterns follow the groups, pairs (0,1), (0,2), ..., (G-2,G-1);
    * ``group_weights``: float32 [B, H, G, F], last DAGT block's pooling weights (sum to 1 over F);
    * ``group_assignment`` (grouping='competitive' only): float32 [B, H, G, F], softmax over G.
  """

  output_space: ClassVar[str | None] = None  # decided by the task heads (losses config)
  # The Pattern Selector's module: a subclass may swap in its own (registry.register_model), a
  # ``nn.Module`` built with PatternSelector's keyword arguments (num_tasks, top_k, adaptive,
  # indicator_hidden, enabled, dtype) whose ``__call__(fields [B, F, d], groups [B, G, d])``
  # returns ``(h [B, T, d], alpha [B, T, F+G])``.
  selector: ClassVar[type[nn.Module]] = PatternSelector

  schema: Schema
  embed_dim: int = 16
  num_blocks: int = 2
  num_groups: int = 8
  num_heads: int = 2
  ffn_mult: int = 2
  grouping: str = "competitive"
  grouping_temperature: float = 1.0
  se: bool = True
  se_reduction: int = 4
  se_squeeze: str = "grouped"
  se_squeeze_groups: int = 4
  se_gate: str = "sigmoid"
  field_ffn: bool = True
  raw_skip: bool = False
  pattern_selector: bool = True
  selection: str = "softmax"
  funnel_indicators: bool = False
  pair_patterns: bool = False
  task_embeddings: int = 0
  selector_top_k: int = 0
  adaptive_indicators: bool = True
  indicator_hidden: int = 32
  tower_hidden: Sequence[int] = (64, 32)
  tower_input: str = "flat"
  dropout: float = 0.0
  dtype: Any = "float32"

  @classmethod
  def from_config(cls, cfg, schema: Schema) -> "APEM":
    kw = layers.common_kwargs(cfg)
    kw.update(
        num_blocks=layers.require_int(cfg, "num_blocks", 1),
        grouping=layers.require_choice(cfg, "grouping", GROUPINGS),
        grouping_temperature=layers.require_positive(cfg, "grouping_temperature"),
        num_heads=layers.require_int(cfg, "num_heads", 1),
        ffn_mult=layers.require_int(cfg, "ffn_mult", 1),
        se=layers.require_bool(cfg, "se"),
        se_reduction=layers.require_int(cfg, "se_reduction", 1),
        se_squeeze=layers.require_choice(cfg, "se_squeeze", SE_SQUEEZES),
        se_squeeze_groups=layers.require_int(cfg, "se_squeeze_groups", 1),
        se_gate=layers.require_choice(cfg, "se_gate", SE_GATES),
        # A cheaper variant (docs/performance.md): False drops the field tokens' FFN sub-layer.
        field_ffn=layers.require_bool(cfg, "field_ffn"),
        raw_skip=layers.require_bool(cfg, "raw_skip"),
        pattern_selector=layers.require_bool(cfg, "pattern_selector"),
        selection=layers.require_choice(cfg, "selection", SELECTIONS),
        funnel_indicators=layers.require_bool(cfg, "funnel_indicators"),
        pair_patterns=layers.require_bool(cfg, "pair_patterns"),
        task_embeddings=layers.require_int(cfg, "task_embeddings", 0),
        selector_top_k=layers.require_int(cfg, "selector_top_k", 0),
        adaptive_indicators=layers.require_bool(cfg, "adaptive_indicators"),
        indicator_hidden=layers.require_int(cfg, "indicator_hidden", 1),
        tower_hidden=layers.require_widths(cfg, "tower_hidden", allow_empty=True),
        tower_input=layers.require_choice(cfg, "tower_input", TOWER_INPUTS),
    )
    # One group: the softmax over groups is the constant 1, so the grouping's queries and keys
    # get no gradient.
    kw["num_groups"] = layers.require_int(cfg, "num_groups", 0 if kw["grouping"] == "none" else 2)
    if kw["embed_dim"] % kw["num_heads"]:
      raise ValueError(f"model config 'num_heads'={kw['num_heads']} must divide "
                       f"'embed_dim'={kw['embed_dim']}")
    if kw["se_squeeze"] == "grouped" and kw["embed_dim"] % kw["se_squeeze_groups"]:
      raise ValueError(f"model config 'se_squeeze_groups'={kw['se_squeeze_groups']} must divide "
                       f"'embed_dim'={kw['embed_dim']}")
    if schema.num_fields == 0:
      raise ValueError("APEM: the schema has no feature fields")
    if kw["pair_patterns"] and kw["grouping"] == "none":
      raise ValueError("model config 'pair_patterns'=True needs a 'grouping' other than 'none' "
                       "(it pairs the group tokens)")
    if kw["task_embeddings"] and not task_embedding_fields(schema, kw["task_embeddings"]):
      raise ValueError(f"model config 'task_embeddings'={kw['task_embeddings']}: no categorical "
                       f"field has at most that many values (vocabulary sizes "
                       f"{[f.vocab_size for f in schema.categorical]})")
    if kw["funnel_indicators"] and (kw["selection"] != "softmax" or not kw["pattern_selector"]
                                    or all(p < 0 for p in schema.parents)):
      raise ValueError("model config 'funnel_indicators'=True needs 'selection'='softmax', "
                       "'pattern_selector'=True and a funnel (a task with depends_on)")
    groups = 0 if kw["grouping"] == "none" else kw["num_groups"]
    patterns = schema.num_fields + groups + (groups * (groups - 1) // 2 if kw["pair_patterns"]
                                             else 0)
    top_k = kw["selector_top_k"]
    if top_k and (top_k >= patterns or (top_k == 1 and kw["selection"] == "softmax")):
      raise ValueError(f"model config 'selector_top_k'={top_k}: expected 0 (dense) or 2 to "
                       f"{patterns - 1}, fewer than the {patterns} patterns (k >= patterns "
                       f"selects every one; k=1 under the softmax is one-hot whatever the "
                       f"logits, so the selector gets no gradient)")
    return cls(schema=schema, **kw)

  @nn.compact
  def __call__(self, batch: dict[str, jax.Array], train: bool = False) -> dict[str, jax.Array]:
    dtype = get_dtype(self.dtype)
    tokens = FieldEmbedding(self.schema, self.embed_dim, self.dtype, name="embedding")(batch)
    dagt = DeepAutoGroupTransformer(
        num_blocks=self.num_blocks, num_groups=self.num_groups, num_heads=self.num_heads,
        ffn_mult=self.ffn_mult, grouping=self.grouping,
        grouping_temperature=self.grouping_temperature, se=self.se,
        se_reduction=self.se_reduction, se_squeeze=self.se_squeeze,
        se_squeeze_groups=self.se_squeeze_groups, se_gate=self.se_gate,
        field_ffn=self.field_ffn, dropout=self.dropout, dtype=self.dtype,
        name="dagt")(tokens, train)
    selector = GatedPatternSelector if self.selection == "gates" else self.selector
    # Funnel steps' indicators read their parent step's selection (only passed when asked for,
    # so that a selector of one's own need not take it).
    funnel = {"parents": self.schema.parents} if self.funnel_indicators else {}
    groups = dagt.groups
    if self.pair_patterns:
      groups = jnp.concatenate([groups, pair_interactions(groups)], axis=1)  # [B, G + P, d]
    h, alpha = selector(
        num_tasks=self.schema.num_tasks, top_k=self.selector_top_k,
        adaptive=self.adaptive_indicators, indicator_hidden=self.indicator_hidden,
        enabled=self.pattern_selector, dtype=self.dtype, name="pattern_selector", **funnel)(
            dagt.fields, groups)
    if self.task_embeddings:  # each tower also reads its task's own embeddings
      h = jnp.concatenate([h, self._task_embeddings(batch).astype(h.dtype)], axis=-1)
    if self.tower_input == "pooled":
      shared = jnp.mean(dagt.fields, axis=1)  # [B, d]
    else:
      shared = dagt.fields.reshape(dagt.fields.shape[0], -1)  # [B, F*d]
    shared = (shared,)
    if self.raw_skip:  # a skip around the DAGT: the towers also read the raw field embeddings
      shared += (tokens.reshape(tokens.shape[0], -1).astype(dtype),)  # after it: [B, F*d]
    # Each tower reads [h_t ; shared...] (BatchedMLP's `shared`: no [B, T, F*d] copy, no
    # concatenation).
    logits = BatchedMLP(self.schema.num_tasks, tuple(self.tower_hidden) + (1,),
                        dropout=self.dropout, activate_final=False, dtype=dtype,
                        float32_output=True, name="towers")(h.astype(dtype), train, shared=shared)
    out = {
        "logits": logits[..., 0].astype(jnp.float32),
        "pattern_weights": alpha.astype(jnp.float32),
        "group_weights": dagt.group_weights.astype(jnp.float32),
    }
    if dagt.group_assignment is not None:
      out["group_assignment"] = dagt.group_assignment.astype(jnp.float32)
    return out

  def _task_embeddings(self, batch: dict[str, jax.Array]) -> jax.Array:
    """Per task, its own embeddings of the fields of at most ``task_embeddings`` values (STEM,
    Su et al. 2024): [B, T, Fs*d]. One table of width T*d per field, so one gather for all
    tasks; its parameters are ``task_embedding/categorical_table`` [rows, T*d], an embedding
    table like the shared one (the embedding optimizer and the sharding rule apply)."""
    fields = task_embedding_fields(self.schema, self.task_embeddings)
    small = Schema(tuple(self.schema.categorical[i] for i in fields), (), self.schema.tasks)
    tasks, width = self.schema.num_tasks, self.embed_dim
    own = FieldEmbedding(small, tasks * width, self.dtype, name="task_embedding")(
        {"categorical": jnp.asarray(batch["categorical"])[:, jnp.asarray(fields)]})  # [B, Fs, T*d]
    batch_size = own.shape[0]
    return own.reshape(batch_size, len(fields), tasks, width).transpose(0, 2, 1, 3).reshape(
        batch_size, tasks, len(fields) * width)


def task_embedding_fields(schema: Schema, max_values: int) -> list[int]:
  """Indices of the categorical fields with at most ``max_values`` values (their vocabulary or
  hash buckets)."""
  return [i for i, f in enumerate(schema.categorical) if f.vocab_size <= max_values]


def pair_interactions(groups: jax.Array) -> jax.Array:
  """groups [B, G, d] -> their pairwise element-wise products [B, G(G-1)/2, d], pairs (i, j),
  i < j, in row-major order: explicit second-order interactions of the field groups (the
  Hadamard interaction of FiBiNet and NFM, taken over groups, not all F(F-1)/2 field pairs)."""
  first, second = np.triu_indices(groups.shape[1], k=1)
  return groups[:, first] * groups[:, second]
