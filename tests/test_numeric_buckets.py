"""Numeric bucket boundaries (data) and bucket embeddings (model)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apem_jax.data import preprocessing as prep
from apem_jax.models.embedding import FieldEmbedding
from apem_jax.schema import NumericField, Schema, Task


def test_boundaries_follow_distinct_values_not_rows():
  # 96% zeros, like capital gains: row quantiles would all be 0; distinct ones spread out.
  values = np.concatenate([np.zeros(960), np.arange(1, 41, dtype=np.float32) * 100])
  cuts = prep.quantile_boundaries(values, 8)
  assert len(cuts) == 7
  assert cuts[0] == pytest.approx(50.0)  # between 0 and 100: zero gets a bucket of its own
  assert all(a < b for a, b in zip(cuts, cuts[1:]))
  assert not set(cuts) & set(values.tolist())  # no training value lies on a cut


def test_boundaries_of_constant_and_few_valued_fields():
  assert prep.quantile_boundaries(np.ones(10), 8) == ()
  assert prep.quantile_boundaries(np.array([0.0, 1.0, 0.0, 1.0]), 8) == (0.5,)


def test_fit_preprocessing_buckets_on_normalised_training_values():
  train = {"x": np.array([0.0, 0.0, 10.0, 20.0, 30.0]), "c": np.array(["a", "b", "a", "a", "b"])}
  fitted = prep.fit_preprocessing(train, ["c"], ["x"], numeric_transform="none", numeric_buckets=4)
  encoded = prep.encode(train, fitted)["numeric"][:, 0]
  cuts = np.asarray(fitted.bucket_boundaries[0])
  buckets = (encoded[:, None] > cuts).sum(-1)
  np.testing.assert_array_equal(buckets, [0, 0, 1, 2, 3])
  assert prep.Preprocessing.from_json(fitted.to_json()) == fitted


def test_bucket_embedding_depends_on_the_bucket():
  schema = Schema(categorical=(), numeric=(NumericField("x", (0.0, 1.0)), NumericField("y")),
                  tasks=(Task("t"),))
  module = FieldEmbedding(schema, embed_dim=4)
  batch = {"numeric": jnp.array([[-0.5, 0.0], [-0.4, 0.0], [0.5, 0.0], [2.0, 0.0]])}
  params = module.init(jax.random.key(0), batch)
  assert params["params"]["numeric_bucket_table"].shape == (2, 3, 4)
  tokens = module.apply(params, batch)
  kernel = params["params"]["numeric_kernel"][0]
  without_linear = tokens[:, 0] - batch["numeric"][:, :1] * kernel
  # Rows 0 and 1 share bucket 0; rows 2 and 3 are in buckets 1 and 2.
  np.testing.assert_allclose(without_linear[0], without_linear[1], atol=1e-6)
  assert not np.allclose(without_linear[1], without_linear[2])
  assert not np.allclose(without_linear[2], without_linear[3])
  # A field without boundaries gets no bucket term: identical inputs, identical tokens.
  np.testing.assert_allclose(tokens[0, 1], tokens[3, 1], atol=1e-6)
