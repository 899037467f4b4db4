"""Tests of apem_jax.models: every registered model, APEM's internals and switches, configs."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apem_jax.models import (MODELS, FieldEmbedding, build_model, default_model_config,
                             table_offsets)
from apem_jax.models.group_transformer import (GroupTransformerBlock, SqueezeExcitation,
                                               squeeze_fields)
from apem_jax.models import layers
from apem_jax.models.layers import MLP, BatchedMLP, LayerNorm, softmax_last, sum_last
from apem_jax.models.pattern_selector import PatternSelector, top_k_mask
from apem_jax.schema import make_schema

B = 8
VOCABS = (5, 7, 3)
NUM_NUMERIC = 2
D = 8
NUM_FIELDS = len(VOCABS) + NUM_NUMERIC


def _schema(num_tasks: int = 2, vocabs=VOCABS, num_numeric=NUM_NUMERIC):
  return make_schema(vocabs, num_numeric, [f"t{i}" for i in range(num_tasks)])


def _batch(num_tasks: int = 2, seed: int = 0, vocabs=VOCABS, num_numeric=NUM_NUMERIC, rows=B):
  rng = np.random.default_rng(seed)
  cat = np.stack([rng.integers(0, v + 1, rows) for v in vocabs], axis=1) if vocabs else np.zeros(
      (rows, 0))
  return {
      "categorical": jnp.asarray(cat, jnp.int32).reshape(rows, len(vocabs)),
      "numeric": jnp.asarray(rng.normal(size=(rows, num_numeric)), jnp.float32),
      "labels": jnp.asarray(rng.integers(0, 2, (rows, num_tasks)), jnp.float32),
      "label_mask": jnp.ones((rows, num_tasks), jnp.float32),
      "weight": jnp.ones((rows,), jnp.float32),
  }


def _config(name: str, **overrides):
  """The model's default config at width D; APEM with one DAGT block (compiling is most of these
  tests' time, and a block's cost is all of it: the shape test keeps the default two)."""
  cfg = default_model_config(name)
  cfg.embed_dim = D
  if name == "apem":
    cfg.num_blocks = 1
  for key, value in overrides.items():
    cfg[key] = value
  return cfg


def _init(model, batch):
  # Eager init: per-op compilations are cached across tests, a jitted init compiles every time.
  return model.init(jax.random.key(0), batch)["params"]


def _run(model, batch, train=False):
  """Eager init, then one jitted value-and-grad of a BCE loss. Returns (params, out, grads)."""
  params = _init(model, batch)
  step = jax.jit(jax.value_and_grad(_loss_fn(model, train), has_aux=True))
  (_, out), grads = step(params, batch, jax.random.key(1))
  return params, out, grads


def _bce(logits, labels):
  return jnp.mean(jnp.maximum(logits, 0) - logits * labels + jnp.log1p(jnp.exp(-jnp.abs(logits))))


def _loss_fn(model, train=False):
  def loss(params, batch, rng):
    out = model.apply({"params": params}, batch, train=train, rngs={"dropout": rng})
    return _bce(out["logits"], batch["labels"]), out
  return loss


# ----------------------------------------------------------------------------------------------
# Every model at its default size, T in {1, 3} (the other tests have two tasks).


@pytest.mark.parametrize("num_tasks", [1, 3])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_shapes_finite_and_gradients(name, num_tasks):
  schema, batch = _schema(num_tasks), _batch(num_tasks)
  config = _config(name, **({"num_blocks": 2} if name == "apem" else {}))
  _, out, grads = _run(build_model(config, schema), batch)  # init + forward + grad, jitted
  chex.assert_shape(out["logits"], (B, num_tasks))
  assert out["logits"].dtype == jnp.float32
  chex.assert_tree_all_finite((out, grads))
  # Every parameter array receives some gradient signal.
  zero = [jax.tree_util.keystr(path) for path, g in jax.tree.leaves_with_path(grads)
          if not np.any(np.asarray(g))]
  assert not zero, f"parameters with all-zero gradients: {zero}"
  # The batch holds out-of-vocabulary ids (id == vocab_size) in some rows.
  assert np.any(np.asarray(batch["categorical"]) == np.asarray(VOCABS))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_dropout_train_path(name):
  schema, batch = _schema(2), _batch(2)
  model = build_model(_config(name, dropout=0.3), schema)
  params = _init(model, batch)
  apply = lambda p, rng, train: model.apply({"params": p}, batch, train=train,
                                            rngs={"dropout": rng})["logits"]
  train_a = apply(params, jax.random.key(1), True)
  train_b = apply(params, jax.random.key(2), True)
  evaluated = apply(params, jax.random.key(1), False)
  chex.assert_tree_all_finite((train_a, train_b, evaluated))
  assert not np.allclose(train_a, train_b), "different dropout keys should give different outputs"
  assert not np.allclose(train_a, evaluated)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_bfloat16_compute_keeps_float32_params_and_logits(name):
  schema, batch = _schema(2), _batch(2)
  model = build_model(_config(name, dtype="bfloat16"), schema)
  params = _init(model, batch)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  out = model.apply({"params": params}, batch)
  assert out["logits"].dtype == jnp.float32
  chex.assert_tree_all_finite(out)
  # The logit layer computes in float32: its outputs are not bfloat16 values cast back (which
  # carry 3 significant digits, so that close scores tie and lower an exact AUC).
  logits = np.asarray(out["logits"])
  assert np.any(logits != logits.astype(jnp.bfloat16).astype(np.float32))


@pytest.mark.parametrize("name", ["apem", "shared_bottom"])
@pytest.mark.parametrize("vocabs,num_numeric", [((), 3), ((4, 6), 0)])
def test_models_with_only_one_field_kind(name, vocabs, num_numeric):
  schema = _schema(2, vocabs, num_numeric)
  batch = _batch(2, vocabs=vocabs, num_numeric=num_numeric)
  model = build_model(_config(name), schema)
  out = model.apply({"params": _init(model, batch)}, batch)
  chex.assert_shape(out["logits"], (B, 2))
  chex.assert_tree_all_finite(out)


# ----------------------------------------------------------------------------------------------
# Field embedding.


def test_embedding_layout_oov_and_distinct_fields():
  schema, batch = _schema(1), _batch(1)
  emb = FieldEmbedding(schema, D)
  params = emb.init(jax.random.key(0), batch)["params"]
  table = params["categorical_table"]
  chex.assert_shape(table, (sum(v + 1 for v in VOCABS), D))
  chex.assert_shape(params["numeric_kernel"], (NUM_NUMERIC, D))
  np.testing.assert_array_equal(table_offsets(schema), [0, 6, 14])
  oov = dict(batch, categorical=jnp.asarray([VOCABS] * B, jnp.int32))
  tokens = emb.apply({"params": params}, oov)
  chex.assert_shape(tokens, (B, NUM_FIELDS, D))
  chex.assert_tree_all_finite(tokens)
  for f, row in enumerate([5, 13, 17]):  # each field's last row is its OOV row
    np.testing.assert_array_equal(tokens[:, f], np.broadcast_to(table[row], (B, D)))
  # Out-of-range ids fall back to the field's OOV row, never another field's rows.
  bad = dict(batch, categorical=jnp.asarray([[-1, 99, 4]] * B, jnp.int32))
  np.testing.assert_array_equal(emb.apply({"params": params}, bad)[:, :3], tokens[:, :3])
  # Id 0 of different fields reads different rows with different values.
  zeros = emb.apply({"params": params}, dict(batch, categorical=jnp.zeros((B, 3), jnp.int32)))
  assert not np.allclose(zeros[0, 0], zeros[0, 1]) and not np.allclose(zeros[0, 1], zeros[0, 2])
  assert not np.allclose(params["numeric_kernel"][0], params["numeric_kernel"][1])


def test_oov_ids_run_through_apem():
  batch = dict(_batch(2), categorical=jnp.asarray([VOCABS] * B, jnp.int32))
  model = build_model(_config("apem"), _schema(2))
  out = model.apply({"params": _init(model, batch)}, batch)
  chex.assert_tree_all_finite(out)


# ----------------------------------------------------------------------------------------------
# APEM internals and ablation switches.


def _apem_out(num_tasks=2, grads=False, **overrides):
  """(params, outputs, grads or None) of APEM with config overrides (eager forward)."""
  schema, batch = _schema(num_tasks), _batch(num_tasks)
  model = build_model(_config("apem", **overrides), schema)
  params = _init(model, batch)
  out = model.apply({"params": params}, batch)
  g = None
  if grads:
    g = jax.jit(jax.grad(lambda p: _loss_fn(model)(p, batch, jax.random.key(1))[0]))(params)
  return params, out, g


def test_apem_competitive_group_weights_are_normalised():
  cfg = _config("apem")
  _, out, _ = _apem_out()
  h, g = cfg.num_heads, cfg.num_groups
  chex.assert_shape(out["group_assignment"], (B, h, g, NUM_FIELDS))
  chex.assert_shape(out["group_weights"], (B, h, g, NUM_FIELDS))
  # Before renormalisation every field distributes itself over the groups ...
  np.testing.assert_allclose(out["group_assignment"].sum(axis=2), 1.0, atol=1e-5)
  # ... and each group's pooling weights sum to 1 over the fields.
  np.testing.assert_allclose(out["group_weights"].sum(axis=3), 1.0, atol=1e-5)
  assert np.all(out["group_weights"] >= 0)


def test_apem_standard_grouping_softmax_over_fields():
  _, out, _ = _apem_out(grouping="standard")
  np.testing.assert_allclose(out["group_weights"].sum(axis=3), 1.0, atol=1e-5)
  assert "group_assignment" not in out


@pytest.mark.parametrize("num_tasks", [1, 3])
def test_apem_pattern_weights_sum_to_one(num_tasks):
  cfg = _config("apem")
  _, out, _ = _apem_out(num_tasks)
  chex.assert_shape(out["pattern_weights"], (B, num_tasks, NUM_FIELDS + cfg.num_groups))
  np.testing.assert_allclose(out["pattern_weights"].sum(axis=-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("k", [2, NUM_FIELDS + 3])
def test_apem_top_k_leaves_exactly_k_weights(k):
  """Every parameter trains (k=1, one-hot whatever the logits, left the selector without
  gradient: refused, as is a k that keeps every pattern)."""
  _, out, grads = _apem_out(grads=True, selector_top_k=k)
  alpha = np.asarray(out["pattern_weights"])
  np.testing.assert_array_equal((alpha > 0).sum(axis=-1), k)
  np.testing.assert_allclose(alpha.sum(axis=-1), 1.0, atol=1e-5)
  chex.assert_tree_all_finite(grads)
  assert all(np.any(np.asarray(g)) for g in jax.tree.leaves(grads))


def test_top_k_mask_counts_ties_once():
  mask = top_k_mask(jnp.zeros((2, 5)), 2)
  np.testing.assert_array_equal(mask.sum(axis=-1), [2, 2])


@pytest.mark.parametrize("overrides", [
    dict(grouping="none"),
    dict(grouping="standard"),
    dict(grouping="competitive"),
    dict(se=False),
    dict(se_squeeze="mean"),
    dict(pattern_selector=False),
    dict(adaptive_indicators=False),
    dict(grouping="none", se=False, pattern_selector=False),
    dict(num_blocks=1, num_groups=2, num_heads=1),
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_apem_ablation_switches(overrides):
  cfg = _config("apem", **overrides)
  groups = 0 if cfg.grouping == "none" else cfg.num_groups
  # Gradients (one compilation each) only where the switch removes a whole sub-network.
  with_grads = cfg.grouping == "none" or not cfg.pattern_selector
  params, out, grads = _apem_out(grads=with_grads, **overrides)
  chex.assert_shape(out["logits"], (B, 2))
  chex.assert_shape(out["pattern_weights"], (B, 2, NUM_FIELDS + groups))
  chex.assert_shape(out["group_weights"], (B, cfg.num_heads, groups, NUM_FIELDS))
  np.testing.assert_allclose(out["pattern_weights"].sum(axis=-1), 1.0, atol=1e-5)
  chex.assert_tree_all_finite((out, grads))
  if with_grads:
    assert all(np.any(np.asarray(g)) for g in jax.tree.leaves(grads))
  if not cfg.pattern_selector:
    np.testing.assert_allclose(out["pattern_weights"], 1.0 / (NUM_FIELDS + groups), atol=1e-6)
    assert "pattern_selector" not in params
  if not cfg.adaptive_indicators:
    assert "indicator_kernel_1" not in params["pattern_selector"]
  if not cfg.se:
    assert "se" not in params.get("dagt", {}).get("block_0", {})


@pytest.mark.parametrize("grouping", ["competitive", "standard"])
def test_apem_gradients_do_not_hang_on_round_off(grouping):
  """Changing every numeric input by one float32 ulp moves each parameter's gradient by about
  1e-6 relative in a well-conditioned model (measured: at most 2e-5). A gradient that moves by
  O(1) is decided by round-off, and so differs between one device and eight or between two CPUs:
  the old mean-over-d SE squeeze (it reads LayerNorm outputs, whose mean over d is zero) and
  softmax-invariant query/key biases (true gradient exactly zero) did."""
  schema, batch = _schema(2), _batch(2, rows=64)
  nudged = dict(batch, numeric=jnp.nextafter(batch["numeric"], jnp.inf))
  model = build_model(_config("apem", grouping=grouping), schema)
  params = _init(model, batch)
  grad = jax.jit(jax.grad(lambda p, b: _loss_fn(model)(p, b, jax.random.key(1))[0]))
  g, g_nudged = grad(params, batch), grad(params, nudged)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g)[0], jax.tree.leaves(g_nudged)):
    a, b = np.asarray(a), np.asarray(b)
    change = np.linalg.norm(a - b) / np.linalg.norm(a)
    assert change < 1e-3, f"{jax.tree_util.keystr(path)}: gradient moved by {change:.2g}"


def _einsum_block(p, fields, grouping, heads):
  """One DAGT block (train=False, float32) written as DESIGN.md states it: per-head projections
  of every token, then attention einsums. The module computes the same function in GEMM shape."""
  apply = lambda module, name, x: module.apply({"params": p[name]}, x)
  dense = lambda x, name, axes, tree=p: (jnp.tensordot(x, tree[name]["kernel"], axes)
                                         + tree[name].get("bias", 0.0))
  batch, num_fields, width = fields.shape
  scale = 1.0 / np.sqrt(width // heads)
  q = dense(p["group_seeds"], "group_query", 1)  # [G, H, dh]
  k, v = dense(fields, "group_key", 1), dense(fields, "group_value", 1)  # [B, F, H, dh]
  logits = jnp.einsum("ghc,bfhc->bhgf", q, k) * scale
  if grouping == "competitive":
    weights = jax.nn.softmax(logits, axis=-2)
    weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-9)
  else:
    weights = jax.nn.softmax(logits, axis=-1)
  pooled = dense(jnp.einsum("bhgf,bfhc->bghc", weights, v), "group_out", 2)
  groups = apply(nn.LayerNorm(), "group_ln1", p["group_seeds"][None] + pooled)
  groups = apply(nn.LayerNorm(), "group_ln2",
                 groups + apply(MLP((2 * width, width), activate_final=False), "group_ffn", groups))
  q2, k2, v2 = (dense(fields, "field_query", 1), dense(groups, "field_key", 1),
                dense(groups, "field_value", 1))
  attn = jax.nn.softmax(jnp.einsum("bfhc,bghc->bhfg", q2, k2) * scale, axis=-1)
  back = dense(jnp.einsum("bhfg,bghc->bfhc", attn, v2), "field_out", 2)
  fields = apply(nn.LayerNorm(), "field_ln1", fields + back)
  fields = apply(nn.LayerNorm(), "field_ln2",
                 fields + apply(MLP((2 * width, width), activate_final=False), "field_ffn", fields))
  gate = jax.nn.sigmoid(dense(jax.nn.relu(dense(squeeze_fields(fields, "grouped", 4),
                                                    "squeeze", 1, p["se"])), "excite", 1, p["se"]))
  return fields * gate[..., None], groups, weights


def _randomised(params, seed: int):
  """Every parameter moved by 0.3 N(0, 1) (biases and LayerNorms too, not their zero/one initial
  values)."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [x + 0.3 * jax.random.normal(k, x.shape)
                                   for x, k in zip(leaves, keys)])


@pytest.mark.parametrize("grouping", ["competitive", "standard"])
def test_dagt_block_in_gemm_shape_computes_the_einsum_formulation(grouping):
  """Values and gradients (parameters and input tokens): the reference is built from flax's
  LayerNorm, the MLP on [B, F, d], jax.nn.softmax and SE's concatenated squeeze."""
  fields = jax.random.normal(jax.random.key(0), (B, NUM_FIELDS, D))
  block = GroupTransformerBlock(num_groups=4, num_heads=2, grouping=grouping)
  params = _randomised(block.init(jax.random.key(1), fields)["params"], 2)
  out = jax.jit(block.apply)({"params": params}, fields)
  ref_fields, ref_groups, ref_weights = jax.jit(_einsum_block, static_argnums=(2, 3))(
      params, fields, grouping, 2)
  chex.assert_trees_all_close((out.fields, out.groups, out.group_weights),
                              (ref_fields, ref_groups, ref_weights), atol=1e-5, rtol=1e-5)
  probe = jax.random.normal(jax.random.key(3), out.fields.shape)

  def score(fn):  # a scalar of both outputs, so that every path gets a cotangent
    return lambda p, x: jnp.sum(fn(p, x)[0] * probe) + jnp.sum(jnp.sin(fn(p, x)[1]))

  module = lambda p, x: block.apply({"params": p}, x)[:2]
  reference = lambda p, x: _einsum_block(p, x, grouping, 2)[:2]
  chex.assert_trees_all_close(jax.jit(jax.grad(score(module), argnums=(0, 1)))(params, fields),
                              jax.jit(jax.grad(score(reference), argnums=(0, 1)))(params, fields),
                              atol=1e-5, rtol=1e-5)


def test_dagt_block_parameters_are_those_of_the_flax_modules():
  """Checkpoint layout: the block's LayerNorms and SE squeeze have the names, shapes and initial
  values of the nn.LayerNorm and nn.Dense they replace (the same key gives the same tree)."""
  fields = jax.random.normal(jax.random.key(0), (B, NUM_FIELDS, D))
  params = GroupTransformerBlock(num_groups=4).init(jax.random.key(1), fields)["params"]
  for name in ("group_ln1", "group_ln2", "field_ln1", "field_ln2"):
    chex.assert_trees_all_equal(params[name], {"scale": jnp.ones(D), "bias": jnp.zeros(D)})

  class FlaxSE(nn.Module):  # SqueezeExcitation's squeeze and excite as two nn.Dense
    @nn.compact
    def __call__(self, x):
      z = nn.Dense(NUM_FIELDS // 4, name="squeeze")(squeeze_fields(x, "grouped", 4))
      return nn.Dense(NUM_FIELDS, name="excite")(z)

  se = SqueezeExcitation()
  chex.assert_trees_all_equal(se.init(jax.random.key(4), fields),
                              FlaxSE().init(jax.random.key(4), fields))
  ln = LayerNorm()
  chex.assert_trees_all_equal(ln.init(jax.random.key(5), fields),
                              nn.LayerNorm().init(jax.random.key(5), fields))


@pytest.mark.parametrize("shape", [(B, NUM_FIELDS, D), (64, 16)])
def test_layer_norm_is_flax_layer_norm(shape):
  x = 3.0 + 2.0 * jax.random.normal(jax.random.key(0), shape)  # mean and scale far from 0, 1
  params = _randomised(nn.LayerNorm().init(jax.random.key(1), x), 2)
  probe = jax.random.normal(jax.random.key(3), shape)
  loss = lambda module: lambda p, x: jnp.sum(module.apply(p, x) * probe)
  chex.assert_trees_all_close(LayerNorm().apply(params, x), nn.LayerNorm().apply(params, x),
                              atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(jax.grad(loss(LayerNorm()), argnums=(0, 1))(params, x),
                              jax.grad(loss(nn.LayerNorm()), argnums=(0, 1))(params, x),
                              atol=1e-5, rtol=1e-5)
  half = LayerNorm(dtype=jnp.bfloat16).apply(params, x.astype(jnp.bfloat16))
  assert half.dtype == jnp.bfloat16


def test_softmax_last_is_jax_softmax():
  x = 4.0 * jax.random.normal(jax.random.key(0), (B, NUM_FIELDS, 2, 8))
  x = x.at[0, 0, 0].set(jnp.array([500.0, -500.0, 0, 0, 0, 0, 0, 1e3]))  # exp would overflow
  probe = jax.random.normal(jax.random.key(1), x.shape)
  loss = lambda fn: lambda x: jnp.sum(fn(x) * probe)
  chex.assert_trees_all_close(softmax_last(x), jax.nn.softmax(x, axis=-1), atol=1e-6)
  chex.assert_trees_all_close(jax.grad(loss(softmax_last))(x),
                              jax.grad(loss(lambda v: jax.nn.softmax(v, axis=-1)))(x), atol=1e-5)
  chex.assert_tree_all_finite(jax.grad(loss(softmax_last))(x))
  sums = jnp.broadcast_to(x.sum(-1, keepdims=True), x.shape)
  chex.assert_trees_all_close(sum_last(x), sums, rtol=1e-6, atol=1e-4)  # CPU: x @ ones
  chex.assert_trees_all_close(layers._sum_by_reduction(x), sums, rtol=1e-6, atol=1e-4)  # GPU


def test_field_ffn_switch_drops_the_field_ffn_sublayer():
  """``field_ffn=False`` (a cheaper variant): no field FFN / second field LayerNorm; the same
  parameters otherwise, and the default keeps them."""
  schema, batch = _schema(2), _batch(2)
  model = build_model(_config("apem"), schema)
  params = _init(model, batch)
  cheap = model.clone(field_ffn=False)
  cheap_params = _init(cheap, batch)
  block = params["dagt"]["block_0"]
  assert {"field_ffn", "field_ln2"} <= set(block)
  assert set(cheap_params["dagt"]["block_0"]) == set(block) - {"field_ffn", "field_ln2"}
  out = cheap.apply({"params": cheap_params}, batch)
  chex.assert_shape(out["logits"], (B, 2))
  chex.assert_tree_all_finite(out)


@pytest.mark.parametrize("top_k", [0, 3])
def test_pattern_selector_in_gemm_shape_computes_the_einsum_formulation(top_k):
  fields = jax.random.normal(jax.random.key(0), (B, NUM_FIELDS, D))
  groups = jax.random.normal(jax.random.key(1), (B, 4, D))
  selector = PatternSelector(num_tasks=2, top_k=top_k, indicator_hidden=8)
  params = selector.init(jax.random.key(2), fields, groups)["params"]
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(3), len(leaves))
  params = jax.tree.unflatten(tree, [x + 0.3 * jax.random.normal(k, x.shape)
                                     for x, k in zip(leaves, keys)])
  h, alpha = selector.apply({"params": params}, fields, groups)
  # DESIGN.md's form: project every pattern, then attend.
  patterns = jnp.concatenate([fields, groups], axis=1)
  hidden = jax.nn.relu(jnp.einsum("bd,tdh->bth", fields.mean(1), params["indicator_kernel_1"])
                       + params["indicator_bias_1"])
  tau = (params["task_indicators"] + jnp.einsum("bth,thd->btd", hidden,
                                                params["indicator_kernel_2"])
         + params["indicator_bias_2"])
  logits = jnp.einsum("btd,bpd->btp", tau, patterns @ params["pattern_key"]["kernel"]) / np.sqrt(D)
  mask = top_k_mask(logits, top_k)
  ref_alpha = jnp.where(mask, jax.nn.softmax(jnp.where(mask, logits, -1e30), axis=-1), 0.0)
  values = patterns @ params["pattern_value"]["kernel"] + params["pattern_value"]["bias"]
  ref_h = jnp.einsum("btp,bpd->btd", ref_alpha, values)
  chex.assert_trees_all_close((h, alpha), (ref_h, ref_alpha), atol=1e-5, rtol=1e-5)
  if top_k:
    np.testing.assert_array_equal((alpha > 0).sum(-1), top_k)


def test_batched_mlp_shared_input_is_the_concatenation():
  own = jax.random.normal(jax.random.key(0), (B, 3, 4))  # [B, M, in]
  shared = jax.random.normal(jax.random.key(1), (B, 10))  # [B, in_s]
  mlp = BatchedMLP(3, (5, 2), activate_final=False)
  concat = jnp.concatenate([own, jnp.broadcast_to(shared[:, None], (B, 3, 10))], axis=-1)
  params = mlp.init(jax.random.key(2), concat)
  chex.assert_trees_all_equal_shapes(params, mlp.init(jax.random.key(2), own, shared=shared))
  chex.assert_trees_all_close(mlp.apply(params, own, shared=shared), mlp.apply(params, concat),
                              atol=1e-6)
  # Several shared arrays are read as their concatenation, in order (APEM's raw skip).
  parts = (shared[:, :7], shared[:, 7:])
  chex.assert_trees_all_equal_shapes(params, mlp.init(jax.random.key(2), own, shared=parts))
  chex.assert_trees_all_close(mlp.apply(params, own, shared=parts), mlp.apply(params, concat),
                              atol=1e-6)


def test_se_mean_squeeze_of_layernormed_tokens_is_round_off():
  tokens = jax.nn.standardize(jax.random.normal(jax.random.key(0), (4, 5, D)), axis=-1)
  assert np.abs(squeeze_fields(tokens, "mean", 1)).max() < 1e-6  # what the old SE read
  grouped = squeeze_fields(tokens, "grouped", 4)
  chex.assert_shape(grouped, (4, 5 * 2 * 4))
  assert np.abs(grouped).mean() > 0.3


def test_apem_adaptive_term_is_the_only_difference_to_static_indicators():
  schema, batch = _schema(2), _batch(2)
  adaptive = build_model(_config("apem"), schema)
  static = build_model(_config("apem", adaptive_indicators=False), schema)
  params = _init(adaptive, batch)
  selector = dict(params["pattern_selector"])
  chex.assert_shape(selector["indicator_kernel_1"], (2, D, 32))  # one g_t per task
  # With g_t's output layer zeroed, tau_t(x) = tau_t: the static model's output.
  zeroed = dict(params, pattern_selector=dict(
      selector, indicator_kernel_2=jnp.zeros_like(selector["indicator_kernel_2"]),
      indicator_bias_2=jnp.zeros_like(selector["indicator_bias_2"])))
  static_params = dict(params, pattern_selector={
      k: v for k, v in selector.items() if not k.startswith("indicator_")})
  want = static.apply({"params": static_params}, batch)["pattern_weights"]
  chex.assert_trees_all_close(adaptive.apply({"params": zeroed}, batch)["pattern_weights"], want,
                              atol=1e-6)
  assert not np.allclose(adaptive.apply({"params": params}, batch)["pattern_weights"], want)


# ----------------------------------------------------------------------------------------------
# Experts differ at initialisation.


def test_mmoe_experts_differ_at_init():
  schema, batch = _schema(2), _batch(2)
  model = build_model(_config("mmoe", num_experts=4), schema)
  params = _init(model, batch)
  kernel = np.asarray(params["experts"]["kernel_0"])  # [E, in, out]
  assert kernel.shape[0] == 4
  for i in range(4):
    for j in range(i + 1, 4):
      assert not np.allclose(kernel[i], kernel[j]), f"experts {i} and {j} are identical"


def test_ple_experts_differ_at_init():
  schema, batch = _schema(2), _batch(2)
  model = build_model(_config("ple", num_levels=2, num_task_experts=2, num_shared_experts=2),
                      schema)
  params = _init(model, batch)
  kernels = [np.asarray(params[f"level_0_task_{t}_experts"]["kernel_0"]) for t in range(2)]
  kernels.append(np.asarray(params["level_0_shared_experts"]["kernel_0"]))
  experts = np.concatenate(kernels, axis=0)  # 6 experts on the same input
  for i in range(len(experts)):
    for j in range(i + 1, len(experts)):
      assert not np.allclose(experts[i], experts[j]), f"experts {i} and {j} are identical"
  assert "level_1_shared_gate" not in params  # last level: task gates only
  # Without shared experts no level has a shared gate (its output would feed nothing).
  no_shared = _init(build_model(_config("ple", num_levels=2, num_task_experts=2,
                                        num_shared_experts=0), schema), batch)
  assert not [k for k in no_shared if "shared" in k]


def test_single_task_shares_nothing():
  schema, batch = _schema(2), _batch(2)
  model = build_model(_config("single_task"), schema)
  params = _init(model, batch)
  assert set(params) == {"embedding_0", "embedding_1", "dnn_0", "dnn_1"}
  grads = jax.jit(jax.grad(lambda p: model.apply({"params": p}, batch)["logits"][:, 0].sum()))(
      params)
  assert not any(np.any(np.asarray(g)) for g in jax.tree.leaves(grads["embedding_1"]))


def test_aitm_transfers_from_the_funnel_parent():
  """In a branching funnel (click; like; buy after click) buy's transfer reads click's state,
  not like's (the task before it); like, a root, has no transfer."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from apem_jax.schema import Task  # pylint: disable=g-import-not-at-top
  schema = dataclasses.replace(make_schema((5, 7), 2, ("a",)), tasks=(
      Task("click"), Task("like"), Task("buy", depends_on="click")))
  batch = {"categorical": jnp.array([[1, 2], [3, 4], [0, 6]], jnp.int32),
           "numeric": jnp.array([[0.5, -1.0], [1.0, 0.0], [-0.3, 2.0]], jnp.float32)}
  model = build_model(_config("aitm"), schema)
  params = _init(model, batch)
  assert "transfer_2" in params and "transfer_1" not in params
  logits = lambda p: model.apply({"params": p}, batch)["logits"]
  moved = jax.tree.map(lambda w: w + 0.5, params["towers"])  # every tower: like's included
  like_only = dict(params, towers=jax.tree.map(
      lambda w, m: w.at[1].set(m[1]), params["towers"], moved))
  np.testing.assert_allclose(logits(like_only)[:, ::2], logits(params)[:, ::2], rtol=1e-6)
  assert not np.allclose(logits(like_only)[:, 1], logits(params)[:, 1])
  out = model.apply({"params": params}, batch)
  np.testing.assert_array_equal(out["transfer_weights"][:, 1], [[0.0, 1.0]] * 3)


def test_output_space_attributes():
  assert MODELS["esmm"].output_space == "conditional"
  assert MODELS["aitm"].output_space == "entire"
  assert MODELS["apem"].output_space is None


# ----------------------------------------------------------------------------------------------
# Config validation and registry.


@pytest.mark.parametrize("name,key,value", [
    ("ple", "num_levels", 0),
    ("ple", "num_task_experts", 0),
    ("mmoe", "num_experts", 1),  # its gate is the constant 1 (Shared-Bottom, untrained gate)
    ("mmoe", "expert_hidden", ()),
    ("apem", "num_heads", 3),  # does not divide embed_dim=8
    ("apem", "grouping", "greedy"),
    ("apem", "num_groups", 1),  # softmax over one group: grouping without gradient
    ("apem", "selector_top_k", -1),
    ("apem", "selector_top_k", 1),  # one-hot: the selector without gradient
    ("apem", "selector_top_k", NUM_FIELDS + default_model_config("apem").num_groups),  # all
    ("apem", "se", "yes"),
    ("apem", "se_squeeze", "max"),
    ("apem", "se_squeeze_groups", 3),  # does not divide embed_dim=8
    ("apem", "dropout", 1.5),
    ("shared_bottom", "dtype", "float16"),
    ("esmm", "tower_hidden", (64, 0)),
    ("aitm", "embed_dim", 0),
])
def test_config_errors_name_the_key(name, key, value):
  cfg = _config(name).to_dict()  # a plain dict: ConfigDict would refuse a type change itself
  cfg[key] = value
  with pytest.raises(ValueError, match=repr(key)):
    build_model(cfg, _schema(2))


def test_unknown_config_key_is_named():
  cfg = _config("mmoe").to_dict()
  cfg["num_expert"] = 4
  with pytest.raises(ValueError, match="num_expert"):
    build_model(cfg, _schema(2))


def test_partial_config_takes_defaults():
  model = build_model({"name": "ple", "num_levels": 1}, _schema(2))
  assert model.num_levels == 1 and model.num_task_experts == 2


def test_registry_unknown_name_lists_models():
  with pytest.raises(ValueError) as err:
    build_model({"name": "transformer"}, _schema(2))
  for name in MODELS:
    assert name in str(err.value)
  with pytest.raises(ValueError, match="mmoe"):
    default_model_config("nope")


def test_default_configs_cover_registry():
  assert set(MODELS) == {"apem", "single_task", "shared_bottom", "mmoe", "ple", "esmm", "aitm"}
  apem = default_model_config("apem")
  assert apem.embed_dim == 16 and apem.num_blocks == 2 and apem.grouping == "competitive"
  for name in MODELS:
    cfg = default_model_config(name)
    assert cfg.name == name and {"embed_dim", "dropout", "dtype"} <= set(cfg)


def test_apem_candidate_switches_keep_shapes_and_do_what_they_say():
  """se_gate='identity_init' is twice the 'sigmoid' gate of the same parameters, so 1 where
  the excite logit is 0 (with zero parameters) and spread around 1 at initialisation (the excite
  kernel starts random); raw_skip widens the towers' input by the F raw field embeddings."""
  from apem_jax.models.group_transformer import SqueezeExcitation
  tokens = jax.random.normal(jax.random.key(0), (4, 5, 8))
  params = SqueezeExcitation().init(jax.random.key(1), tokens)
  halved = SqueezeExcitation(gate="sigmoid").apply(params, tokens)
  np.testing.assert_allclose(SqueezeExcitation(gate="identity_init").apply(params, tokens),
                             2 * halved, rtol=1e-6)
  gates = np.asarray(halved / tokens)
  assert 0 < gates.min() < 0.45 and 0.55 < gates.max() < 1  # random at initialisation
  zero = jax.tree.map(jnp.zeros_like, params)  # the excite logits are 0: the gate's midpoint
  for gate, expected in (("identity_init", 1.0), ("sigmoid", 0.5)):
    np.testing.assert_allclose(SqueezeExcitation(gate=gate).apply(zero, tokens),
                               expected * tokens, rtol=1e-6)
  schema = make_schema(vocab_sizes=(5, 7), num_numeric=2, task_names=("a", "b"))
  batch = {"categorical": jnp.zeros((3, 2), jnp.int32), "numeric": jnp.zeros((3, 2))}
  widths = {}
  for skip in (False, True):
    cfg = default_model_config("apem")
    cfg.update(embed_dim=8, num_blocks=1, num_groups=2, tower_hidden=(16,), raw_skip=skip,
               se_gate="identity_init")
    model = build_model(cfg, schema)
    params = model.init(jax.random.key(0), batch)["params"]
    assert model.apply({"params": params}, batch)["logits"].shape == (3, 2)
    widths[skip] = params["towers"]["kernel_0"].shape[-2]  # [T, in, out]: in = d + shared
  assert widths[True] == widths[False] + 4 * 8


def test_a_schema_refuses_two_tasks_of_one_name():
  """A schema given in Python or read from a dict took (a, a, b after a): parents (-1, -1, 0),
  the second 'a' unreachable by name (specs refuse it; Schema did not)."""
  from apem_jax.schema import Task  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match=r"^schema: duplicate task names \['a'\]$"):
    make_schema((5,), 1, ("a", "a", "b"))
  with pytest.raises(ValueError, match=r"duplicate task names"):
    make_schema((5,), 1, ("a",)).__class__(categorical=(), numeric=(), tasks=(
        Task("a"), Task("a"), Task("b", depends_on="a")))
