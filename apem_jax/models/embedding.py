"""Field embedding: every feature field becomes one token of width d (DESIGN.md section 2).

Parameter layout (collection 'params' of a ``FieldEmbedding``):

* ``categorical_table``: float32 ``[sum_f (vocab_size_f + 1), d]``. The per-field tables are
  stacked in schema order: field f owns rows ``[offset_f, offset_f + vocab_size_f]``, where
  ``offset_f = sum_{g<f} (vocab_size_g + 1)`` (see :func:`table_offsets`); its last row
  (``offset_f + vocab_size_f``) is the out-of-vocabulary row. One table means one gather for all
  fields, and row-sharding a large table is a single PartitionSpec on axis 0.
* ``numeric_kernel``, ``numeric_bias``: float32 ``[Fn, d]``; numeric field f maps x to
  ``x * numeric_kernel[f] + numeric_bias[f]``.
* ``numeric_bucket_table``: float32 ``[Fn, K, d]``, only when some numeric field of the schema has
  bucket ``boundaries`` (K = 1 + the most boundaries of any field): the embedding of the value's
  bucket ``#{b : x > b}`` is added to the field's token, so a field's token can depend on its
  value non-linearly (thresholds, as in capital gains) before any attention or MLP.

Absent when the schema has no field of that kind. Output ``E0``: ``[B, Fc + Fn, d]``,
categorical fields first, then numeric, in schema order.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from apem_jax.models.layers import PARAM_DTYPE, get_dtype
from apem_jax.schema import Schema

EMBED_INIT_STDDEV = 0.05


def table_offsets(schema: Schema) -> np.ndarray:
  """int32 [Fc]: first row of each categorical field in the concatenated table."""
  rows = np.array([f.num_rows for f in schema.categorical], dtype=np.int64)
  return (np.cumsum(rows) - rows).astype(np.int32)


def total_rows(schema: Schema) -> int:
  return int(sum(f.num_rows for f in schema.categorical))


class FieldEmbedding(nn.Module):
  """Embeds a batch's ``categorical`` [B, Fc] and ``numeric`` [B, Fn] arrays into [B, F, d].

  Ids outside ``[0, vocab_size_f]`` (which the data pipeline should never emit) are mapped to the
  field's OOV row, so they can never read another field's rows.
  """

  schema: Schema
  embed_dim: int
  dtype: Any = "float32"

  @nn.compact
  def __call__(self, batch: dict[str, jax.Array]) -> jax.Array:
    dtype = get_dtype(self.dtype)
    init = nn.initializers.normal(stddev=EMBED_INIT_STDDEV)
    tokens = []
    num_cat, num_num = len(self.schema.categorical), len(self.schema.numeric)
    if num_cat + num_num == 0:
      raise ValueError("FieldEmbedding: the schema has no fields")
    if num_cat:
      table = self.param("categorical_table", init, (total_rows(self.schema), self.embed_dim),
                         PARAM_DTYPE)
      ids = jnp.asarray(batch["categorical"]).astype(jnp.int32)  # [B, Fc]
      vocab = jnp.asarray(self.schema.vocab_sizes, jnp.int32)  # [Fc]
      ids = jnp.where((ids < 0) | (ids > vocab), vocab, ids)
      rows = ids + jnp.asarray(table_offsets(self.schema))  # [B, Fc]
      tokens.append(jnp.take(table, rows, axis=0).astype(dtype))  # [B, Fc, d]
    if num_num:
      kernel = self.param("numeric_kernel", init, (num_num, self.embed_dim), PARAM_DTYPE)
      bias = self.param("numeric_bias", init, (num_num, self.embed_dim), PARAM_DTYPE)
      # In float32 whatever the compute dtype: a bfloat16 input would keep 3 significant digits
      # of every standardised value.
      x = jnp.asarray(batch["numeric"], jnp.float32)[..., None]  # [B, Fn, 1]
      numeric_tokens = (x * kernel + bias).astype(dtype)  # [B, Fn, d]
      if any(f.boundaries for f in self.schema.numeric):
        numeric_tokens = numeric_tokens + self._bucket_embedding(batch["numeric"], init, dtype)
      tokens.append(numeric_tokens)
    return tokens[0] if len(tokens) == 1 else jnp.concatenate(tokens, axis=1)

  def _bucket_embedding(self, numeric: jax.Array, init, dtype) -> jax.Array:
    """numeric [B, Fn] -> embeddings of each value's bucket [B, Fn, d]."""
    fields = self.schema.numeric
    num_buckets = 1 + max(len(f.boundaries) for f in fields)
    cuts = np.full((len(fields), num_buckets - 1), np.inf, np.float32)
    for i, f in enumerate(fields):
      cuts[i, :len(f.boundaries)] = f.boundaries
    table = self.param("numeric_bucket_table", init, (len(fields), num_buckets, self.embed_dim),
                       PARAM_DTYPE)
    x = jnp.asarray(numeric, jnp.float32)
    buckets = jnp.sum(x[..., None] > jnp.asarray(cuts), axis=-1)  # [B, Fn]
    rows = buckets + num_buckets * jnp.arange(len(fields))  # into the flattened table
    flat = table.reshape(len(fields) * num_buckets, self.embed_dim)
    return jnp.take(flat, rows, axis=0).astype(dtype)
