"""Candidate Pattern Selector designs: the gated selector (``model.selection='gates'``,
models/gated_selector.py) against a direct computation, top-k, and APEM built with it; funnel
indicators (``model.funnel_indicators``) that start as the default selector."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apem_jax.models import build_model
from apem_jax.models.gated_selector import GatedPatternSelector
from apem_jax.models.pattern_selector import PatternSelector
from test_models import B, NUM_FIELDS, _apem_out, _batch, _config, _schema

T, F, G, D = 2, 5, 3, 8


def _patterns(seed=0):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=(B, F, D)), jnp.float32),
          jnp.asarray(rng.normal(size=(B, G, D)), jnp.float32))


@pytest.mark.parametrize("adaptive", [False, True])
def test_gates_scale_each_pattern_as_computed_directly(adaptive):
  fields, groups = _patterns()
  selector = GatedPatternSelector(num_tasks=T, adaptive=adaptive, indicator_hidden=4)
  params = selector.init(jax.random.key(0), fields, groups)["params"]
  h, alpha = selector.apply({"params": params}, fields, groups)
  chex.assert_shape(h, (B, T, (F + G) * D))
  chex.assert_shape(alpha, (B, T, F + G))
  # Directly: tau_t(x), then gamma_{t,p} = 2 sigmoid(<W_k^T tau_t(x), P_p> / sqrt(d)).
  p = _flat(params)
  bank = np.concatenate([fields, groups], axis=1).astype(np.float64)  # [B, N, d]
  tau = np.broadcast_to(p["task_indicators"], (B, T, D))
  if adaptive:
    hidden = np.maximum(np.einsum("bd,tdh->bth", bank[:, :F].mean(1), p["indicator_kernel_1"])
                        + p["indicator_bias_1"], 0)
    tau = tau + np.einsum("bth,thd->btd", hidden, p["indicator_kernel_2"]) + p["indicator_bias_2"]
  w_k = p["pattern_key/kernel"]
  logits = np.einsum("btd,bnd->btn", np.einsum("btd,ed->bte", tau, w_k), bank) / np.sqrt(D)
  gamma = 2 / (1 + np.exp(-logits))
  np.testing.assert_allclose(alpha, gamma / 2, atol=1e-5)
  expected = (gamma[..., None] * bank[:, None]).reshape(B, T, -1)
  np.testing.assert_allclose(h, expected, atol=1e-4)


def _flat(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}/"))
    else:
      out[f"{prefix}{k}"] = np.asarray(v, np.float64)
  return out


def test_top_k_keeps_exactly_k_gates_open():
  fields, groups = _patterns(1)
  selector = GatedPatternSelector(num_tasks=T, top_k=3)
  params = selector.init(jax.random.key(0), fields, groups)["params"]
  h, alpha = selector.apply({"params": params}, fields, groups)
  np.testing.assert_array_equal((np.asarray(alpha) > 0).sum(-1), 3)
  closed = np.asarray(alpha) == 0  # a closed gate zeroes its pattern's whole slice of h
  np.testing.assert_array_equal(np.asarray(h).reshape(B, T, F + G, D)[closed], 0.0)


def test_apem_with_gates_trains_and_is_a_config_switch():
  params, out, grads = _apem_out(grads=True, selection="gates")
  cfg = _config("apem")
  chex.assert_shape(out["logits"], (B, 2))
  chex.assert_shape(out["pattern_weights"], (B, 2, NUM_FIELDS + cfg.num_groups))
  assert np.all((np.asarray(out["pattern_weights"]) > 0) & (np.asarray(out["pattern_weights"]) < 1))
  chex.assert_tree_all_finite(grads)
  assert np.any(np.asarray(grads["pattern_selector"]["pattern_key"]["kernel"]))
  # The towers read the gated bank [(F+G)*d] besides the field tokens [F*d], instead of h_t [d].
  soft, _, _ = _apem_out(selection="softmax")
  d, n = cfg.embed_dim, NUM_FIELDS + cfg.num_groups
  assert params["towers"]["kernel_0"].shape[1] == n * d + NUM_FIELDS * d
  assert soft["towers"]["kernel_0"].shape[1] == d + NUM_FIELDS * d
  with pytest.raises(ValueError, match="selection"):
    build_model(_config("apem", selection="gated"), _schema())


def test_funnel_indicators_start_as_the_default_and_chain_the_steps():
  """parents=(-1, 0, 1): with U = 0 (its initialisation) the selection is the default
  selector's; with U != 0 only the steps that have a parent change, and step 2 (whose parent
  is step 1) through step 1's selection."""
  fields, groups = _patterns(2)
  plain = PatternSelector(num_tasks=3, indicator_hidden=4)
  chained = PatternSelector(num_tasks=3, indicator_hidden=4, parents=(-1, 0, 1))
  params = chained.init(jax.random.key(0), fields, groups)["params"]
  assert not np.any(np.asarray(params["parent_kernel"]))
  without = {k: v for k, v in params.items() if k != "parent_kernel"}
  h0, alpha0 = plain.apply({"params": without}, fields, groups)
  h1, alpha1 = chained.apply({"params": params}, fields, groups)
  np.testing.assert_allclose(h1, h0, atol=1e-6)
  np.testing.assert_allclose(alpha1, alpha0, atol=1e-6)
  params["parent_kernel"] = params["parent_kernel"].at[2].set(jnp.eye(D))  # step 2 reads step 1
  _, alpha2 = chained.apply({"params": params}, fields, groups)
  np.testing.assert_allclose(alpha2[:, :2], alpha0[:, :2], atol=1e-6)  # steps 0, 1: unchanged
  assert np.abs(np.asarray(alpha2[:, 2] - alpha0[:, 2])).max() > 1e-3
  params["parent_kernel"] = params["parent_kernel"].at[1].set(jnp.eye(D))  # step 1 reads step 0
  _, alpha3 = chained.apply({"params": params}, fields, groups)
  np.testing.assert_allclose(alpha3[:, 0], alpha0[:, 0], atol=1e-6)  # the first step: unchanged
  assert np.abs(np.asarray(alpha3[:, 1] - alpha2[:, 1])).max() > 1e-3
  assert np.abs(np.asarray(alpha3[:, 2] - alpha2[:, 2])).max() > 1e-4  # through step 1's h
  with pytest.raises(ValueError, match="parents"):
    PatternSelector(num_tasks=2, parents=(1, -1)).init(jax.random.key(0), fields, groups)


def test_apem_funnel_indicators_config_switch():
  base = _schema(2)
  schema = dataclasses.replace(base, tasks=(base.tasks[0], dataclasses.replace(
      base.tasks[1], depends_on=base.tasks[0].name)))
  batch = _batch(2)
  model = build_model(_config("apem", funnel_indicators=True), schema)
  params = model.init(jax.random.key(0), batch)["params"]
  d = _config("apem").embed_dim
  assert params["pattern_selector"]["parent_kernel"].shape == (2, d, d)
  chex.assert_shape(model.apply({"params": params}, batch)["logits"], (B, 2))
  # Refused where it would change nothing: under gates, without the selector, without a funnel.
  for wrong, on in ((dict(selection="gates"), schema), (dict(pattern_selector=False), schema),
                    ({}, base)):
    with pytest.raises(ValueError, match="funnel_indicators"):
      build_model(_config("apem", funnel_indicators=True, **wrong), on)
