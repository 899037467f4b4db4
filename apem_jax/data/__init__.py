"""Data: dataset specs of a user's files, their preparation into shards and streamed reading;
the built-in sources (Census-Income (KDD) as files plus a spec, synthetic MMoE data, synthetic
conversion funnels); preprocessing; the in-memory input pipeline.

The only package that imports TensorFlow (lazily: importing it does not load TF). Entry point::

  splits = apem_jax.data.load_dataset(config.data)
"""

from apem_jax.data.columns import dataset_from_columns
from apem_jax.data.pipeline import DatasetSplits
from apem_jax.data.pipeline import load_dataset
from apem_jax.data.preprocessing import encode
from apem_jax.data.preprocessing import fit_preprocessing
from apem_jax.data.preprocessing import Preprocessing

__all__ = ["DatasetSplits", "dataset_from_columns", "load_dataset", "encode", "fit_preprocessing",
           "Preprocessing"]
