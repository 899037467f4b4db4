"""Device mesh, shardings, and the compiled forms of the pure step functions.

The step functions themselves (``apem_jax.step``) know nothing of devices; this module only wraps
them. The mesh has two axes, ``data`` (the batch is split over it) and ``model`` (reserved for
row-sharded embedding tables; size 1 unless configured).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
MODEL_AXIS = "model"


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


def to_host(x: jax.Array) -> np.ndarray:
  """A (possibly multi-process) global array, gathered whole on every host."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)
