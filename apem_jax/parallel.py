"""Device mesh, shardings, and the compiled forms of the pure step functions.

The step functions themselves (``apem_jax.step``) know nothing of devices; this module only wraps
them, in one of two ways (``config.parallel.mode``):

* ``jit`` (default): ``jax.jit`` over a 2-D mesh ``(data, model)`` of every device of every
  process. The batch is split over ``data``; dense weights are replicated; large embedding tables
  are row-sharded over ``model`` (:func:`state_shardings`), and XLA inserts the collectives.
* ``pmap``: ``jax.pmap`` over this process's devices (pure data parallelism): the state is
  replicated (one copy per device, :func:`replicate`), every device runs the same
  ``train_step`` on its slice of the batch (:func:`pmap_batch`) with ``axis_name=PMAP_AXIS``,
  and the step all-reduces the gradients and metrics itself. Checkpoints and evaluation use the
  jit form of the state (:func:`unreplicate`), so a checkpoint does not depend on the mode.

Large tables (the rule): a state leaf named like an embedding table (``TABLE_NAMES``), 2-D, with at
least ``shard_embeddings_min_rows`` rows gets ``PartitionSpec('model', None)`` when the ``model``
axis has more than one device; that covers the parameter and every optimizer-state leaf that
mirrors it (Adam's ``mu`` and ``nu`` end in the same path). Each device then holds
``rows / model`` rows. A row-sharded dimension must be a multiple of the axis size, so
:func:`pad_tables` stores such a table with its rows padded up to the next multiple: the model
still sees exactly its own ``[rows, d]`` table (a slice, which XLA keeps sharded), the padding rows
are never read and get zero gradients. The padded shape is what checkpoints hold, so resuming
needs the same ``parallel.model_parallelism`` (when padding was needed at all).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
MODEL_AXIS = "model"
PMAP_AXIS = "devices"
MODES = ("jit", "pmap")
# Parameter names of embedding tables ([rows, d]) that may be row-sharded.
TABLE_NAMES = ("categorical_table",)


def make_mesh(model_parallelism: int = 1) -> Mesh:
  """A (data, model) mesh over every device of every process."""
  num_devices = jax.device_count()
  if model_parallelism < 1 or num_devices % model_parallelism:
    raise ValueError(f"parallel.model_parallelism={model_parallelism} must be >= 1 and divide "
                     f"the {num_devices} devices")
  # Auto axes: XLA's partitioner propagates shardings through the model from the inputs.
  return jax.make_mesh((num_devices // model_parallelism, model_parallelism),
                       (DATA_AXIS, MODEL_AXIS), axis_types=(AxisType.Auto, AxisType.Auto))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over ``data``; the rest replicated."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(batch_size: int, mesh: Mesh, field: str = "train.batch_size") -> None:
  data_size = mesh.shape[DATA_AXIS]
  if batch_size % data_size or batch_size % jax.process_count():
    raise ValueError(f"{field}={batch_size} must be divisible by the data axis size {data_size} "
                     f"and the process count {jax.process_count()}")


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows of a batch -> global ``jax.Array``s sharded over ``data``."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


# --------------------------------------------------------------------------------------------
# Large embedding tables
# --------------------------------------------------------------------------------------------

def _key_name(key: Any) -> Any:
  return getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))


def _is_large_table(path: tuple, leaf: Any, min_rows: int) -> bool:
  return (min_rows > 0 and bool(path) and _key_name(path[-1]) in TABLE_NAMES
          and len(leaf.shape) == 2 and leaf.shape[0] >= min_rows)


def state_shardings(abstract_state: Any, mesh: Mesh, min_rows: int) -> Any:
  """The sharding of every leaf of a state (a pytree of arrays or ``ShapeDtypeStruct``s).

  Embedding tables with at least ``min_rows`` rows (and the optimizer-state leaves that mirror
  them: same name, same shape) are row-sharded, ``P('model', None)``, when the mesh's ``model``
  axis is larger than 1; everything else is replicated. ``min_rows=0`` disables sharding.
  """
  model_size = mesh.shape[MODEL_AXIS]

  def rule(path, leaf):
    if model_size > 1 and _is_large_table(path, leaf, min_rows):
      if leaf.shape[0] % model_size:
        raise ValueError(f"{jax.tree_util.keystr(path)}: {leaf.shape[0]} rows do not divide over "
                         f"the model axis of {model_size} devices; build the model with "
                         f"parallel.pad_tables")
      return NamedSharding(mesh, P(MODEL_AXIS, None))
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(rule, abstract_state)


def with_shardings(abstract_state: Any, shardings: Any) -> Any:
  """``ShapeDtypeStruct``s carrying their shardings (what Orbax restores into)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      abstract_state, shardings)


def _map_padded(params: Any, padding: Mapping[tuple, tuple[int, int]], fn: Callable) -> Any:
  def visit(path, leaf):
    key = tuple(_key_name(k) for k in path)
    return fn(leaf, *padding[key]) if key in padding else leaf
  return jax.tree_util.tree_map_with_path(visit, params)


class RowPaddedModel:
  """A Flax model whose large tables are stored with padded rows (see the module doc).

  Has the two methods the step functions use: ``init`` (pads the listed tables with zero rows)
  and ``apply`` (gives the model the first ``rows`` rows of each). Other attributes are the
  model's.

  Attributes:
    model: the wrapped ``flax.linen.Module``.
    padding: parameter path (tuple of names) -> (rows, padded rows).
  """

  def __init__(self, model: Any, padding: Mapping[tuple, tuple[int, int]]):
    self.model = model
    self.padding = dict(padding)

  def init(self, rngs, *args, **kwargs) -> dict:
    variables = dict(self.model.init(rngs, *args, **kwargs))
    variables["params"] = self.pad(variables["params"])
    return variables

  def pad(self, params: Any) -> Any:
    """The wrapped model's ``params`` as stored: each listed table padded with zero rows."""
    return _map_padded(
        params, self.padding,
        lambda x, rows, padded: jnp.pad(x, ((0, padded - rows),) + ((0, 0),) * (x.ndim - 1)))

  def unpad(self, params: Any) -> Any:
    """``params`` as the wrapped model takes them: each padded table's first ``rows`` rows."""
    return _map_padded(params, self.padding, lambda x, rows, padded: x[:rows])

  def apply(self, variables, *args, **kwargs):
    variables = dict(variables)
    variables["params"] = self.unpad(variables["params"])
    return self.model.apply(variables, *args, **kwargs)

  def __getattr__(self, name: str) -> Any:
    if name == "model":  # not set yet (e.g. while copying): do not recurse
      raise AttributeError(name)
    return getattr(self.model, name)


def table_padding(model: Any) -> dict[tuple, tuple[int, int]]:
  """The padded tables of a model :func:`pad_tables` returned (``{}``: none)."""
  return model.padding if isinstance(model, RowPaddedModel) else {}


def repad(params: Any, stored_as: Any, model: Any) -> Any:
  """``params`` of ``stored_as`` (a model :func:`pad_tables` returned for one model axis) as
  ``model`` (the same model, padded for another) stores them: the padding rows, zero, cut or
  added."""
  if isinstance(stored_as, RowPaddedModel):
    params = stored_as.unpad(params)
  return model.pad(params) if isinstance(model, RowPaddedModel) else params


def pad_tables(model: Any, example_inputs: Mapping[str, Any], model_size: int,
               min_rows: int) -> Any:
  """``model``, wrapped in :class:`RowPaddedModel` if a table to be row-sharded over a mesh's
  ``model`` axis of ``model_size`` devices has a number of rows that is not a multiple of it
  (export rebuilds a model-parallel run's parameter shapes this way on any devices)."""
  if model_size == 1 or min_rows <= 0:
    return model
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), example_inputs, train=False))["params"]
  padding = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    rows = leaf.shape[0] if leaf.shape else 0
    if _is_large_table(path, leaf, min_rows) and rows % model_size:
      padding[tuple(_key_name(k) for k in path)] = (rows, math.ceil(rows / model_size) * model_size)
  return RowPaddedModel(model, padding) if padding else model


# --------------------------------------------------------------------------------------------
# jit
# --------------------------------------------------------------------------------------------

def jit_train_step(train_step: Callable, mesh: Mesh, state_sharding: Any) -> Callable:
  """``train_step(state, batch) -> (state, metrics)`` jitted over the mesh, state donated."""
  return jax.jit(train_step,
                 in_shardings=(state_sharding, batch_sharding(mesh)),
                 out_shardings=(state_sharding, replicated(mesh)),
                 donate_argnums=0)


def jit_eval_step(eval_step: Callable, mesh: Mesh, state_sharding: Any) -> Callable:
  """``eval_step(state, batch) -> outputs [B, ...]``, outputs sharded like the batch."""
  return jax.jit(eval_step,
                 in_shardings=(state_sharding, batch_sharding(mesh)),
                 out_shardings=batch_sharding(mesh))


# --------------------------------------------------------------------------------------------
# pmap
# --------------------------------------------------------------------------------------------

def pmap_train_step(train_step: Callable) -> Callable:
  """``train_step`` (with ``axis_name=PMAP_AXIS`` bound) under ``jax.pmap``, state donated.

  Takes the replicated state (:func:`replicate`) and a batch from :func:`pmap_batch`; returns the
  new replicated state and the metrics once (the step all-reduces them, so every device holds the
  same values).

  Raises:
    ValueError: ``train_step`` is a ``functools.partial`` (``step.bind_steps``) bound without
      ``axis_name=PMAP_AXIS``: each device would train on its own, with no error.
  """
  bound = getattr(train_step, "keywords", None)
  if isinstance(bound, dict) and "axis_name" in bound and bound["axis_name"] != PMAP_AXIS:
    raise ValueError(f"pmap_train_step: the step is bound with axis_name={bound['axis_name']!r}; "
                     f"bind it with axis_name=parallel.PMAP_AXIS ({PMAP_AXIS!r}) so that the "
                     f"devices average their gradients")
  # The metrics come out unmapped (``out_axes=None``: device 0's, which all devices share), so no
  # eager indexing of a mapped output follows each step.
  return jax.pmap(train_step, axis_name=PMAP_AXIS, donate_argnums=0, out_axes=(0, None))


def pmap_batch(local_batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """This process's rows [B_local, ...] -> [local devices, B_local / local devices, ...]."""
  n = jax.local_device_count()
  out = {}
  for k, v in local_batch.items():
    if v.shape[0] % n:
      raise ValueError(f"batch of {v.shape[0]} rows per process does not split over the {n} "
                       f"local devices")
    out[k] = np.reshape(v, (n, v.shape[0] // n) + v.shape[1:])
  return out


def replicate(state: Any) -> Any:
  """A fully replicated state (jit form) -> one copy per local device, leading axis [devices]."""
  devices = jax.local_devices()
  sharding = NamedSharding(Mesh(np.array(devices), (PMAP_AXIS,)), P(PMAP_AXIS))

  def put(x):
    if not x.sharding.is_fully_replicated:
      raise ValueError("parallel.mode='pmap' replicates the whole state; row-sharded tables need "
                       "parallel.mode='jit'")
    local = x.addressable_data(0)
    return jax.device_put(jnp.broadcast_to(local, (len(devices),) + local.shape), sharding)

  return jax.tree.map(put, state)


def unreplicate(state: Any, shardings: Any) -> Any:
  """The inverse of :func:`replicate`: global arrays with ``shardings`` (replicated), built from
  the per-device copies without a round trip through the host."""
  def get(x, sharding):
    shape = x.shape[1:]
    return jax.make_array_from_single_device_arrays(
        shape, sharding, [s.data.reshape(shape) for s in x.addressable_shards])
  return jax.tree.map(get, state, shardings)


def to_host(x: jax.Array) -> np.ndarray:
  """A (possibly multi-process) global array, gathered whole on every host."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)
