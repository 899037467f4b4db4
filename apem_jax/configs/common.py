"""Pieces shared by the config files: the trainer defaults and the Census-Income data section."""

import ml_collections

from apem_jax.models.defaults import default_model_config


def base_config(model: str | None = None) -> ml_collections.ConfigDict:
  """Trainer, optimizer, parallelism and checkpoint defaults, and ``model``'s default config if
  named; the data section comes from callers (or ``data=`` in Python)."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.train = ml_collections.ConfigDict(dict(
      batch_size=1024,
      eval_batch_size=8192,
      num_epochs=10,
      patience=3,             # evaluations without improvement before stopping
      eval_every_steps=0,     # evaluate on validation (and save) every N steps; 0: once per epoch
      checkpoint_every_steps=0,  # also save every N steps between evaluations; 0: only at them
      log_every=50,
      task_weights=(),        # one per task; empty means all ones
      progress_bar=True,
      # Conversion funnels (tasks with depends_on; apem_jax/losses.py): 'entire_space' (q_t chained
      # by product, BCE(p_t, y_t) on every impression) | 'conditional' (a step's q_t trained only
      # where its parent step happened: the biased classic) | 'off' (independent heads).
      funnel="entire_space",
      # lambda * sum_t mean(max(p_t - p_{t-1}, 0)); None: 0.6 for AITM (its paper), 0 otherwise.
      calibration_weight=ml_collections.config_dict.placeholder(float),
      # Task balancing (apem_jax/balancing.py): 'fixed' (task_weights) | 'uncertainty' | 'dwa' |
      # 'gradnorm' | 'pcgrad' | 'cagrad' | 'mgda'.
      balancing="fixed",
      balancing_alpha=1.5,        # GradNorm's asymmetry alpha (>= 0)
      balancing_temperature=2.0,  # DWA's softmax temperature (> 0)
      balancing_window=100,       # DWA: steps per loss-averaging window (its paper: an epoch)
      cagrad_c=0.5,               # CAGrad's c: radius of the ball around the mean gradient (>= 0)
  ))
  config.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=1e-3,
      schedule="cosine",      # 'constant' | 'cosine' (linear warmup then cosine decay)
      warmup_steps=100,
      final_lr_ratio=0.05,
      b1=0.9,
      b2=0.999,
      weight_decay=0.0,
      grad_clip_norm=1.0,     # 0 disables clipping
      # The embedding tables' own optimizer (apem_jax/optimizers.py): 'same' (the Adam above) |
      # 'adagrad' (row-wise) | 'lazy_adam' (only the rows in the batch move). The two keys after
      # it are that optimizer's (an error with 'same').
      embedding_optimizer="same",
      embedding_learning_rate=0.0,  # 0: learning_rate
      embedding_l2=0.0,       # L2 on the table rows present in each batch
  ))
  config.parallel = ml_collections.ConfigDict(dict(
      mode="jit",             # 'jit' (NamedSharding over a (data, model) mesh) | 'pmap' (data parallel)
      model_parallelism=1,    # size of the mesh's 'model' axis (jit only; must divide the devices)
      shard_embeddings_min_rows=1_000_000,  # tables with >= this many rows are row-sharded over
                                            # 'model' (jit, model_parallelism > 1); 0 disables
  ))
  if model is not None:
    config.model = default_model_config(model)
  config.checkpoint = ml_collections.ConfigDict(dict(
      keep_latest=2,          # newest checkpoints kept (>= 2: a resume falls back if one is bad),
                              # besides the best-scoring evaluated one
      async_save=True,        # write checkpoints in the background while training goes on
  ))
  return config


def input_keys() -> dict:
  """How a prepared dataset is read, each left unset (None: the loader's default) so that a
  command line can set it (``--config.data.stream=true``): ``shard_rows`` (rows per prepared
  shard), ``stream`` (stream the shards, or read them into memory: the default for a spec is to
  stream, for a built-in dataset to read into memory), and the streamed input's
  ``shuffle_buffer``, ``stream_groups`` and ``interleave_cycle`` (apem_jax/data/stream.py)."""
  placeholder = ml_collections.config_dict.placeholder
  return dict(shard_rows=placeholder(int), stream=placeholder(bool),
              shuffle_buffer=placeholder(int), stream_groups=placeholder(int),
              interleave_cycle=placeholder(int))


def census_data(task_group: str = "income_marital") -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name="census_income",
      data_dir="data",
      task_group=task_group,       # 'income_marital' | 'education_marital'
      numeric_transform="none",    # 'none' | 'log1p', applied before standardisation
      min_count=1,
      numeric_buckets=32,           # >1: also embed each numeric value's training-quantile bucket
      **input_keys(),
  ))


def census_config(model_name: str, task_group: str = "income_marital") -> ml_collections.ConfigDict:
  config = base_config()
  config.data = census_data(task_group)
  config.model = default_model_config(model_name)
  return config
