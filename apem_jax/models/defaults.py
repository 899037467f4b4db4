"""Default model configs: every key a model reads, with its default.

Config files in ``configs/`` start from ``default_model_config(name)`` and override keys.
``registry.build_model`` fills keys a config leaves out from these defaults and rejects keys that
are not listed here (so a typo is an error, not a silently ignored setting).
"""

from __future__ import annotations

import ml_collections

_COMMON = dict(embed_dim=16, dropout=0.0, dtype="float32")

_DEFAULTS: dict[str, dict] = {
    "apem": dict(
        num_blocks=2,  # DAGT blocks L
        num_groups=8,  # G
        num_heads=2,  # H (must divide embed_dim)
        ffn_mult=2,  # FFN hidden = ffn_mult * embed_dim
        grouping="competitive",  # 'competitive' | 'standard' | 'none'
        grouping_temperature=1.0,  # grouping logits / T: T < 1 sharpens which fields a group takes
        se=True,  # Squeeze-and-Excitation over fields
        se_reduction=4,  # SE reduction ratio r
        se_squeeze="grouped",  # 'grouped' (mean and max of K channel groups) | 'mean' (ablation)
        se_squeeze_groups=4,  # K; must divide embed_dim
        se_gate="sigmoid",  # 'sigmoid' | 'identity_init' (2 * sigmoid: centred on 1, not 1/2)
        field_ffn=True,  # False: no FFN sub-layer on the field tokens (cheaper; docs/performance.md)
        raw_skip=False,  # towers also read the raw field embeddings (a skip around the DAGT)
        pattern_selector=True,  # False: mean pooling of patterns
        selection="softmax",  # 'softmax' (one average per task) | 'gates' (per-task pattern gates)
        funnel_indicators=False,  # a funnel step's indicator reads its parent step's selection
        pair_patterns=False,  # the group tokens' pairwise products as extra patterns
        task_embeddings=0,  # V > 0: per-task embeddings of the fields of <= V values (STEM)
        selector_top_k=0,  # 0 = dense selection; k > 0 = top-k patterns
        adaptive_indicators=True,  # False: static task indicators
        indicator_hidden=32,  # hidden width of g_t
        tower_hidden=(64, 32),
        tower_input="flat",  # towers read [h_t ; field tokens flattened] ('pooled': their mean)
    ),
    "single_task": dict(bottom_hidden=(128, 64), tower_hidden=(64, 32)),
    "shared_bottom": dict(bottom_hidden=(128, 64), tower_hidden=(64, 32)),
    "mmoe": dict(num_experts=8, expert_hidden=(128, 64), tower_hidden=(64, 32)),
    "ple": dict(num_levels=2, num_shared_experts=2, num_task_experts=2, expert_hidden=(128, 64),
                tower_hidden=(64, 32)),
    "esmm": dict(tower_hidden=(128, 64, 32)),
    "aitm": dict(tower_hidden=(128, 64, 32), transfer_hidden=(32,)),
}


def register_defaults(name: str, defaults: dict) -> None:
  """Makes ``defaults`` (every key model ``name`` reads besides embed_dim, dropout and dtype) the
  defaults of a newly registered model (:func:`apem_jax.models.registry.register_model`)."""
  if name in _DEFAULTS:
    raise ValueError(f"model {name!r} is already registered")
  _DEFAULTS[name] = dict(defaults)


def default_model_config(name: str) -> ml_collections.ConfigDict:
  """A ConfigDict with ``name`` and every key model ``name`` reads, set to its default."""
  if name not in _DEFAULTS:
    raise ValueError(f"unknown model {name!r}; registered models: {sorted(_DEFAULTS)}")
  return ml_collections.ConfigDict(dict(name=name, **_COMMON, **_DEFAULTS[name]))
