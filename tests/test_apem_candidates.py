"""Candidate APEM designs (docs/apem_designs.md): the group tokens' pairwise interactions as
extra patterns (``model.pair_patterns``), per-task embeddings of the small-vocabulary fields
(``model.task_embeddings``, STEM) and a temperature on the grouping (``model.grouping_temperature``)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apem_jax.models import build_model
from apem_jax.models.apem import pair_interactions
from test_models import B, D, NUM_FIELDS, VOCABS, _apem_out, _batch, _config, _init, _schema


def test_pair_interactions_are_the_products_of_every_pair_of_groups():
  groups = np.random.default_rng(0).normal(size=(2, 4, 3)).astype(np.float32)
  got = np.asarray(pair_interactions(jnp.asarray(groups)))
  expected = [groups[:, i] * groups[:, j] for i in range(4) for j in range(i + 1, 4)]
  np.testing.assert_allclose(got, np.stack(expected, axis=1), rtol=1e-6)


def test_pair_patterns_add_patterns_not_parameters():
  default_params, _, _ = _apem_out(num_groups=4)
  params, out, grads = _apem_out(num_groups=4, pair_patterns=True, grads=True)
  chex.assert_trees_all_equal_shapes(params, default_params)
  chex.assert_shape(out["pattern_weights"], (B, 2, NUM_FIELDS + 4 + 6))
  np.testing.assert_allclose(np.asarray(out["pattern_weights"]).sum(-1), 1.0, atol=1e-5)
  chex.assert_tree_all_finite(grads)


@pytest.mark.parametrize("selection", ["softmax", "gates"])
def test_task_embeddings_reach_their_own_tower_only(selection):
  """Fields with at most 5 values (vocabularies 5 and 3 of (5, 7, 3)) get one table of width
  T*d; changing task 0's columns changes task 0's logits and no other task's."""
  schema, batch = _schema(3), _batch(3)
  model = build_model(_config("apem", task_embeddings=5, selection=selection), schema)
  params = _init(model, batch)
  table = params["task_embedding"]["categorical_table"]
  chex.assert_shape(table, ((VOCABS[0] + 1) + (VOCABS[2] + 1), 3 * D))
  before = model.apply({"params": params}, batch)["logits"]
  changed = jax.tree_util.tree_map(lambda x: x, params)
  changed["task_embedding"]["categorical_table"] = table.at[:, :D].add(0.5)
  after = model.apply({"params": changed}, batch)["logits"]
  assert np.abs(np.asarray(after[:, 0] - before[:, 0])).max() > 1e-4
  np.testing.assert_array_equal(np.asarray(after[:, 1:]), np.asarray(before[:, 1:]))


@pytest.mark.parametrize("grouping,output,axis", [("competitive", "group_assignment", 2),
                                                   ("standard", "group_weights", 3)])
def test_grouping_temperature_divides_the_grouping_logits(grouping, output, axis):
  """With the same parameters, the softmax the grouping takes (over groups for 'competitive',
  over fields for 'standard') at temperature T is softmax(log(p) / T) of its value p at T = 1."""
  params, out, _ = _apem_out(num_blocks=1, grouping=grouping)
  sharp_params, sharp, _ = _apem_out(num_blocks=1, grouping=grouping, grouping_temperature=0.25)
  chex.assert_trees_all_equal(params, sharp_params)
  expected = jax.nn.softmax(jnp.log(out[output]) / 0.25, axis=axis)
  np.testing.assert_allclose(sharp[output], expected, atol=1e-5)
  assert np.std(sharp[output]) > 2 * np.std(out[output])  # sharper


def test_bad_candidate_settings_are_one_line_errors():
  with pytest.raises(ValueError, match=r"'grouping_temperature' must be a number > 0, got 0"):
    build_model(_config("apem", grouping_temperature=0), _schema())
  with pytest.raises(ValueError, match=r"'task_embeddings'=2: no categorical field has at most"):
    build_model(_config("apem", task_embeddings=2), _schema())
  with pytest.raises(ValueError, match=r"'pair_patterns'=True needs a 'grouping' other than "
                                       r"'none'"):  # no group tokens to pair
    build_model(_config("apem", pair_patterns=True, grouping="none"), _schema())
