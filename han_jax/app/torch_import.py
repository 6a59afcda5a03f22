"""Import the original's PyTorch checkpoints (and export han-jax parameters in their layout).

The original (ML-OSINT 75d6392, ``analysis/train_multi_resolution.py``) saves
``{"model_state_dict", "multi_task_loss_state_dict", "optimizer_state_dict",
"scheduler_state_dict", "epoch", "best_val_loss", "train_history",
"val_history", "config"}`` with ``torch.save``. This module reads such a file
(:func:`read_torch_checkpoint`; torch is an optional dependency, imported only
there), works out the :class:`~han_jax.config.ModelConfig` the weights were
trained with (:func:`infer_model_config`), and maps the model's state_dict onto
the Flax ``params`` tree of :class:`~han_jax.model.MultiResolutionHAN`
(:func:`state_dict_to_params`) and back (:func:`params_to_state_dict`). The
mapping works on numpy arrays, so everything but the file reading runs without
torch.

The mapping is one table (:func:`_layout`), written in the order of the
original's ``state_dict()``, from which both directions are derived:

* every torch key is consumed exactly once and every Flax leaf (the tree
  ``jax.eval_shape`` of ``model.init`` gives) is filled exactly once; a missing,
  unexpected or misshaped key is a :class:`CheckpointMismatch` that names it
  (with the expected and found shape), and nothing is dropped silently;
* ``nn.Linear`` weights ``[out, in]`` become Flax kernels ``[in, out]``;
  ``nn.MultiheadAttention``'s packed ``in_proj_weight [3D, D]`` becomes
  ``in_proj_kernel [D, 3D]`` (q, k, v stay in torch's order); ``nn.Conv1d``
  weights ``[out, in, k]`` become ``[k, in, out]``; LayerNorm/GroupNorm
  ``weight`` is Flax's ``scale``; embeddings, tokens and scalars are copied;
* the state_dict's buffers (sinusoidal tables and causal masks) are constants
  han-jax computes itself: on import each is checked against han-jax's value
  (masks exactly; tables to 1e-3, because torch and numpy round the float32
  ``sin``/``cos`` of arguments up to 1500 differently, by at most 1.2e-4 at
  ``1500 x 128``) and then not used; on export han-jax's values are written.

The parameter tree does not depend on ``ModelConfig.vmap_sources``: the daily
encoders declare their layer parameters under the same names whether or not
the stacks are later vmapped (``han_jax/model/stacking.py``), so one mapping
serves both.

What the weights do not determine: ``nhead`` (the packed attention weights are
``[3D, D]`` for any head count), ``dropout``, ``local_window`` and han-jax's own
switches (``forecast_residual``, ``regime_daily_state``, ``vmap_sources``, ...). They come from the
checkpoint's config when it records them (the original's run manager writes
``nhead`` and ``dropout`` into its ``training_config``; the trainer's own
``config`` entry holds only optimiser settings), else from ``base``, else from
``ModelConfig``'s defaults (``nhead=8``, the original's training value).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pickle
import re
import zipfile
from typing import Any, Iterable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from han_jax import tasks
from han_jax.app.run_folder import lock_run_dir
from han_jax.app.runs import prepare, write_run_folder
from han_jax.config import ConfigError, ModelConfig
from han_jax.model import MultiResolutionHAN
from han_jax.model.common import sinusoidal_table
from han_jax.training.checkpoints import zero_inputs
from han_jax.training.spec import StepSpec
from han_jax.training.steps import state_with_parameters

TORCH_INSTALL_HINT = (
    'reading a PyTorch checkpoint needs torch, an optional dependency of han-jax: pip install -e ".[torch]" '
    "(CPU-only wheels, much smaller: pip install torch --index-url https://download.pytorch.org/whl/cpu)"
)

# Top-level entries of the trainer's checkpoint that han-jax does not import: the
# optimiser and scheduler states belong to torch's AdamW and LR scheduler (han-jax's
# optax state is built fresh).
NOT_IMPORTED = ("optimizer_state_dict", "scheduler_state_dict")

# Sinusoidal buffers must equal han-jax's table to this (see the module docstring).
TABLE_ATOL = 1e-3

_MAX_LISTED = 20


class CheckpointMismatch(ValueError):
    """A state_dict (or params tree) that does not match the model configuration.

    Attributes:
      missing: keys the configuration needs that are absent.
      unexpected: keys present that the configuration has no place for.
      misshaped: ``(key, expected shape, found shape)`` triples.
      invalid: ``(key, reason)`` pairs: wrong dtype, or a buffer that differs
        from han-jax's constant.
    """

    def __init__(self, context: str, *, missing: Sequence[str] = (), unexpected: Sequence[str] = (),
                 misshaped: Sequence[tuple] = (), invalid: Sequence[tuple] = ()):
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.misshaped = list(misshaped)
        self.invalid = list(invalid)
        parts = []
        if self.missing:
            parts.append(f"missing key(s) ({len(self.missing)}): {_listing(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected key(s) ({len(self.unexpected)}): {_listing(self.unexpected)}")
        if self.misshaped:
            items = [f"{k} expected {list(e)} found {list(f)}" for k, e, f in self.misshaped]
            parts.append(f"misshaped key(s) ({len(items)}): {_listing(items)}")
        if self.invalid:
            parts.append(f"invalid value(s) ({len(self.invalid)}): {_listing([f'{k}: {r}' for k, r in self.invalid])}")
        super().__init__(f"{context}: " + "; ".join(parts))


class CheckpointFormatError(ValueError):
    """A file that is not a checkpoint of the original trainer nor a bare state_dict."""


def _listing(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f", ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")


# ---------------------------------------------------------------------------
# The mapping table.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Param:
    """One torch parameter and the Flax leaf it fills.

    ``transposed``: the Flax array is the torch array with its axes reversed
    (Linear ``[out, in] -> [in, out]``, Conv1d ``[out, in, k] -> [k, in, out]``).
    """

    torch_name: str
    flax_path: tuple[str, ...]
    transposed: bool = False


@dataclasses.dataclass(frozen=True)
class _Buffer:
    """One torch buffer that han-jax recomputes: checked on import, written on export."""

    torch_name: str
    kind: str  # "causal_mask" or "sinusoidal"
    shape: tuple[int, ...]


class _Builder:
    """Collects the table entries of one module tree (torch prefix, Flax path)."""

    def __init__(self):
        self.entries: list[_Param | _Buffer] = []

    def param(self, t: str, f: tuple[str, ...], transposed: bool = False) -> None:
        self.entries.append(_Param(t, f, transposed))

    def buffer(self, t: str, kind: str, shape: tuple[int, ...]) -> None:
        self.entries.append(_Buffer(t, kind, shape))

    def linear(self, t: str, f: tuple[str, ...]) -> None:
        # han_jax.model.common.Linear wraps nn.Dense as "dense".
        self.param(f"{t}.weight", f + ("dense", "kernel"), transposed=True)
        self.param(f"{t}.bias", f + ("dense", "bias"))

    def conv(self, t: str, f: tuple[str, ...]) -> None:
        self.param(f"{t}.weight", f + ("conv", "kernel"), transposed=True)
        self.param(f"{t}.bias", f + ("conv", "bias"))

    def norm(self, t: str, f: tuple[str, ...]) -> None:
        self.param(f"{t}.weight", f + ("scale",))
        self.param(f"{t}.bias", f + ("bias",))

    def embedding(self, t: str, f: tuple[str, ...]) -> None:
        self.param(f"{t}.weight", f + ("embedding",))

    def mha(self, t: str, f: tuple[str, ...]) -> None:
        # Packed [3D, D] -> [D, 3D]: q, k, v keep torch's order (q = x @ W[:D].T = x @ kernel[:, :D]).
        self.param(f"{t}.in_proj_weight", f + ("in_proj_kernel",), transposed=True)
        self.param(f"{t}.in_proj_bias", f + ("in_proj_bias",))
        self.linear(f"{t}.out_proj", f + ("out_proj",))

    def cross_attention(self, t: str, f: tuple[str, ...]) -> None:
        for name in ("query_proj", "key_proj", "value_proj", "output_proj"):
            self.linear(f"{t}.{name}", f + (name,))

    def pre_norm_layer(self, t: str, f: tuple[str, ...]) -> None:
        """``nn.TransformerEncoderLayer(norm_first=True)`` (han_jax.model.transformer)."""
        self.mha(f"{t}.self_attn", f + ("self_attn",))
        self.linear(f"{t}.linear1", f + ("linear1",))
        self.linear(f"{t}.linear2", f + ("linear2",))
        self.norm(f"{t}.norm1", f + ("norm1",))
        self.norm(f"{t}.norm2", f + ("norm2",))

    def mlp_trunk(self, t: str, f: tuple[str, ...], indices: tuple[int, int, int]) -> None:
        """``Sequential(Linear, LayerNorm, GELU, Dropout, Linear, ...)`` -> ``MLPTrunk``."""
        lin0, norm0, lin1 = indices
        self.linear(f"{t}.{lin0}", f + ("linear_0",))
        self.norm(f"{t}.{norm0}", f + ("norm_0",))
        self.linear(f"{t}.{lin1}", f + ("linear_1",))


@functools.lru_cache(maxsize=16)
def _layout(cfg: ModelConfig) -> tuple[_Param | _Buffer, ...]:
    """The whole mapping for ``cfg``, in the order of the original's ``state_dict()``.

    torch orders a module's state as its own parameters, its own buffers, then
    its children in registration order; the entries below follow the original's
    ``__init__`` methods (``docs/model.md`` sections 3.1 to 3.8).
    """
    b = _Builder()
    d = cfg.d_model

    # Stage 1: DailySourceEncoder, one per daily source (ModuleDict keyed by name).
    for name, _ in cfg.daily_sources:
        t, f = f"daily_encoders.{name}", (f"daily_encoders_{name}",)
        b.param(f"{t}.no_observation_token", f + ("no_observation_token",))
        if cfg.causal:
            b.buffer(f"{t}.causal_mask", "causal_mask", (cfg.max_daily_len, cfg.max_daily_len))
        b.linear(f"{t}.feature_projection.0", f + ("feature_projection",))
        b.norm(f"{t}.feature_projection.1", f + ("feature_norm",))
        b.param(f"{t}.feature_embedding.weight", f + ("feature_embedding",))  # a plain param in han-jax
        b.embedding(f"{t}.observation_status_embedding", f + ("observation_status_embedding",))
        b.buffer(f"{t}.positional_encoding.pe", "sinusoidal", (1, cfg.max_daily_len, d))
        for i in range(cfg.num_daily_layers):
            b.pre_norm_layer(f"{t}.transformer_encoder.layers.{i}", f + (f"layers_{i}",))
        b.norm(f"{t}.output_norm", f + ("output_norm",))

    # Stage 2: DailyCrossSourceFusion with its TemporalSourceGate.
    t, f = "daily_fusion", ("daily_fusion",)
    b.embedding(f"{t}.source_type_embedding", f + ("source_type_embedding",))
    for i in range(cfg.num_fusion_layers):
        b.mha(f"{t}.cross_attention_layers.{i}", f + (f"cross_attention_{i}",))
    for i in range(cfg.num_fusion_layers):
        b.norm(f"{t}.layer_norms.{i}", f + (f"layer_norms_{i}",))
    for i in range(cfg.num_fusion_layers):
        b.linear(f"{t}.ffn_layers.{i}.0", f + (f"ffn_{i}_0",))
        b.linear(f"{t}.ffn_layers.{i}.3", f + (f"ffn_{i}_1",))
    for i in range(cfg.num_fusion_layers):
        b.norm(f"{t}.ffn_norms.{i}", f + (f"ffn_norms_{i}",))
    g, fg = f"{t}.source_gate", f + ("source_gate",)
    b.param(f"{g}.learnable_temp", fg + ("learnable_temp",))
    for i in range(3):  # kernel sizes (3, 7, 14)
        b.conv(f"{g}.multi_scale_convs.{i}.0", fg + (f"multi_scale_convs_{i}",))
    b.linear(f"{g}.scale_fusion.0", fg + ("scale_fusion",))
    b.norm(f"{g}.scale_fusion.1", fg + ("scale_fusion_norm",))
    b.param(f"{g}.temporal_encoding.scale", fg + ("temporal_encoding", "scale"))
    b.embedding(f"{g}.temporal_encoding.position_embedding", fg + ("temporal_encoding", "position_embedding"))
    b.embedding(f"{g}.temporal_encoding.day_of_week_embedding", fg + ("temporal_encoding", "day_of_week_embedding"))
    b.norm(f"{g}.temporal_encoding.layer_norm", fg + ("temporal_encoding", "layer_norm"))
    b.mha(f"{g}.temporal_attention", fg + ("temporal_attention",))
    b.norm(f"{g}.attn_norm", fg + ("attn_norm",))
    b.linear(f"{g}.gate_projection.0", fg + ("gate_projection_0",))
    b.norm(f"{g}.gate_projection.1", fg + ("gate_projection_norm",))
    b.linear(f"{g}.gate_projection.4", fg + ("gate_projection_1",))
    b.linear(f"{g}.gate_projection.7", fg + ("gate_projection_2",))
    b.linear(f"{t}.output_projection.0", f + ("output_projection_0",))
    b.norm(f"{t}.output_projection.1", f + ("output_projection_norm0",))
    b.linear(f"{t}.output_projection.4", f + ("output_projection_1",))
    b.norm(f"{t}.output_projection.5", f + ("output_projection_norm1",))

    # Stage 3: DailyTemporalEncoder.
    t, f = "daily_temporal_encoder", ("daily_temporal_encoder",)
    b.param(f"{t}.pos_scale", f + ("pos_scale",))
    b.param(f"{t}.residual_scale", f + ("residual_scale",))
    b.buffer(f"{t}.sinusoidal_pe", "sinusoidal", (1, cfg.max_daily_len, d))
    b.embedding(f"{t}.day_of_week_embedding", f + ("day_of_week_embedding",))
    b.embedding(f"{t}.month_embedding", f + ("month_embedding",))
    b.norm(f"{t}.pos_norm", f + ("pos_norm",))
    for i in range(4):  # kernel sizes (3, 7, 14, 28)
        b.conv(f"{t}.multi_scale_conv.{i}.0", f + (f"multi_scale_conv_{i}",))
        b.norm(f"{t}.multi_scale_conv.{i}.1", f + (f"multi_scale_norm_{i}",))  # GroupNorm
    b.linear(f"{t}.conv_fusion.0", f + ("conv_fusion",))
    b.norm(f"{t}.conv_fusion.1", f + ("conv_fusion_norm",))
    b.linear(f"{t}.temporal_gate.0", f + ("temporal_gate_0",))
    b.norm(f"{t}.temporal_gate.1", f + ("temporal_gate_norm",))
    b.linear(f"{t}.temporal_gate.4", f + ("temporal_gate_1",))
    b.mha(f"{t}.local_attention", f + ("local_attention",))
    b.norm(f"{t}.attn_norm", f + ("attn_norm",))
    b.linear(f"{t}.output_gate.0", f + ("output_gate",))
    b.norm(f"{t}.output_norm", f + ("output_norm",))

    # Stage 4: EnhancedLearnableMonthlyAggregation.
    t, f = "monthly_aggregation", ("monthly_aggregation",)
    b.param(f"{t}.month_queries", f + ("month_queries",))
    b.embedding(f"{t}.month_position_embedding", f + ("month_position_embedding",))
    b.mha(f"{t}.cross_attention", f + ("cross_attention",))
    b.linear(f"{t}.ffn.0", f + ("ffn_0",))
    b.linear(f"{t}.ffn.3", f + ("ffn_1",))
    b.norm(f"{t}.norm1", f + ("norm1",))
    b.norm(f"{t}.norm2", f + ("norm2",))
    b.linear(f"{t}.output_projection", f + ("output_projection",))

    # Stage 5: MultiSourceMonthlyEncoder; its encoders are keyed by name in torch, by position in han-jax.
    t, f = "monthly_encoder", ("monthly_encoder",)
    for i, (name, _) in enumerate(cfg.monthly_sources):
        s, fs = f"{t}.source_encoders.{name}", f + (f"source_encoders_{i}",)
        b.param(f"{s}.no_observation_token", fs + ("no_observation_token",))
        b.param(f"{s}.cls_token", fs + ("cls_token",))
        b.buffer(f"{s}.sinusoidal_pe", "sinusoidal", (cfg.max_months, d))
        b.linear(f"{s}.feature_projection", fs + ("feature_projection",))
        b.embedding(f"{s}.feature_embedding", fs + ("feature_embedding",))
        b.embedding(f"{s}.observation_status_embedding", fs + ("observation_status_embedding",))
        b.embedding(f"{s}.temporal_embedding", fs + ("temporal_embedding",))
        b.mha(f"{s}.feature_attention", fs + ("feature_attention",))
        b.norm(f"{s}.feature_norm", fs + ("feature_norm",))
        for j in range(cfg.num_monthly_layers):
            lt, lf = f"{s}.encoder_layers.{j}", fs + (f"encoder_layers_{j}",)
            b.mha(f"{lt}.self_attn", lf + ("self_attn",))
            b.linear(f"{lt}.ffn.0", lf + ("ffn_0",))
            b.linear(f"{lt}.ffn.3", lf + ("ffn_1",))
            b.norm(f"{lt}.norm1", lf + ("norm1",))
            b.norm(f"{lt}.norm2", lf + ("norm2",))
        b.linear(f"{s}.output_projection.0", fs + ("output_projection",))
        b.norm(f"{s}.output_projection.1", fs + ("output_norm",))
        b.linear(f"{s}.uncertainty_head.0", fs + ("uncertainty_head_0",))
        b.linear(f"{s}.uncertainty_head.2", fs + ("uncertainty_head_1",))
    b.embedding(f"{t}.source_type_embedding", f + ("source_type_embedding",))
    for i in range(cfg.num_fusion_layers):
        b.mha(f"{t}.cross_source_attention.{i}", f + (f"cross_source_attention_{i}",))
    for i in range(cfg.num_fusion_layers):
        b.norm(f"{t}.cross_source_norms.{i}", f + (f"cross_source_norms_{i}",))
    b.linear(f"{t}.output_projection.0", f + ("output_projection_0",))
    b.norm(f"{t}.output_projection.1", f + ("output_projection_norm0",))
    b.linear(f"{t}.output_projection.4", f + ("output_projection_1",))
    b.norm(f"{t}.output_projection.5", f + ("output_projection_norm1",))
    b.linear(f"{t}.source_importance_head.0", f + ("source_importance_0",))
    b.linear(f"{t}.source_importance_head.2", f + ("source_importance_1",))

    # Stage 6: CrossResolutionFusion (its aggregator's pre_proj is an Identity: no parameters).
    t, f = "cross_resolution_fusion", ("cross_resolution_fusion",)
    b.param(f"{t}.daily_aggregator.month_query", f + ("daily_aggregator", "month_query"))
    b.cross_attention(f"{t}.daily_aggregator.cross_attn", f + ("daily_aggregator", "cross_attn"))
    b.linear(f"{t}.monthly_proj", f + ("monthly_proj",))
    b.norm(f"{t}.monthly_norm", f + ("monthly_norm",))
    for i in range(cfg.num_fusion_layers):
        lt, lf = f"{t}.fusion_layers.{i}", f + (f"fusion_layers_{i}",)
        b.cross_attention(f"{lt}.cross_attn_a_to_b", lf + ("cross_attn_a_to_b",))
        b.cross_attention(f"{lt}.cross_attn_b_to_a", lf + ("cross_attn_b_to_a",))
        b.norm(f"{lt}.norm_a", lf + ("norm_a",))
        b.norm(f"{lt}.norm_b", lf + ("norm_b",))
        b.linear(f"{lt}.gate_a.0", lf + ("gate_a",))
        b.linear(f"{lt}.gate_b.0", lf + ("gate_b",))
    for side in ("daily", "monthly"):
        b.linear(f"{t}.ffn_{side}.0", f + (f"ffn_{side}_0",))
        b.linear(f"{t}.ffn_{side}.3", f + (f"ffn_{side}_1",))
    b.norm(f"{t}.ffn_norm_daily", f + ("ffn_norm_daily",))
    b.norm(f"{t}.ffn_norm_monthly", f + ("ffn_norm_monthly",))

    # Stage 7: TemporalEncoder.
    t, f = "temporal_encoder", ("temporal_encoder",)
    if cfg.causal:
        b.buffer(f"{t}.causal_mask", "causal_mask", (cfg.max_months, cfg.max_months))
    b.buffer(f"{t}.positional_encoding.pe", "sinusoidal", (1, cfg.max_months, d))
    for i in range(cfg.num_temporal_layers):
        b.pre_norm_layer(f"{t}.transformer_encoder.layers.{i}", f + (f"layers_{i}",))
    b.norm(f"{t}.output_norm", f + ("output_norm",))

    # Stage 8: heads.
    b.mlp_trunk("casualty_head.shared", ("casualty_head", "shared"), (0, 1, 4))
    b.linear("casualty_head.mean_head", ("casualty_head", "mean_head"))
    b.linear("casualty_head.log_var_head", ("casualty_head", "log_var_head"))
    for head in ("regime_head", "anomaly_head", "forecast_head"):
        b.mlp_trunk(f"{head}.mlp", (head, "trunk"), (0, 1, 4))
        b.linear(f"{head}.mlp.7", (head, "output"))
    t, f = "daily_forecast_head", ("daily_forecast_head",)
    if cfg.use_latent_forecast:
        b.embedding(f"{t}.horizon_embeddings", f + ("horizon_embeddings",))
        b.linear(f"{t}.predictor.0", f + ("predictor_0",))
        b.norm(f"{t}.predictor.1", f + ("predictor_norm",))
        b.linear(f"{t}.predictor.4", f + ("predictor_1",))
    else:
        b.mha(f"{t}.context_attn", f + ("context_attn",))
        b.mlp_trunk(f"{t}.forecast_net", f + ("forecast_net", "trunk"), (0, 1, 4))
        b.linear(f"{t}.forecast_net.7", f + ("forecast_net", "output"))
    b.linear("uncertainty_estimator.mlp.0", ("uncertainty_estimator", "linear_0"))
    b.linear("uncertainty_estimator.mlp.2", ("uncertainty_estimator", "linear_1"))
    return tuple(b.entries)


@functools.lru_cache(maxsize=16)
def _flax_shapes(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Shape of every leaf of ``MultiResolutionHAN(cfg)``'s params, from ``jax.eval_shape`` of init."""
    # Any window the model accepts gives the same parameter shapes; keep it short.
    inputs = zero_inputs(cfg, min(32, cfg.max_daily_len), min(2, cfg.max_months))
    model = MultiResolutionHAN(config=cfg)
    tree = jax.eval_shape(lambda key: model.init({"params": key}, inputs, deterministic=True), jax.random.PRNGKey(0))
    return {path: tuple(leaf.shape) for path, leaf in _flatten(tree["params"]).items()}


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, prefix + (key,)))
        else:
            out[prefix + (key,)] = value
    return out


def _unflatten(leaves: Mapping[tuple[str, ...], Any]) -> dict:
    tree: dict = {}
    for path, value in leaves.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def _checked_layout(cfg: ModelConfig) -> tuple[tuple[_Param | _Buffer, ...], dict]:
    """The table for ``cfg`` and the Flax shapes, after checking the table covers the tree exactly once."""
    layout, shapes = _layout(cfg), _flax_shapes(cfg)
    torch_names = [e.torch_name for e in layout]
    flax_paths = [e.flax_path for e in layout if isinstance(e, _Param)]
    if len(set(torch_names)) != len(torch_names) or len(set(flax_paths)) != len(flax_paths):
        raise RuntimeError("han_jax.app.torch_import: the mapping table names a torch key or a Flax leaf twice")
    uncovered = sorted("/".join(p) for p in set(shapes) - set(flax_paths))
    unknown = sorted("/".join(p) for p in set(flax_paths) - set(shapes))
    if uncovered or unknown:
        # A model change without a matching mapping change: a bug here, not in the checkpoint.
        raise RuntimeError(
            "han_jax.app.torch_import: the mapping table and MultiResolutionHAN's parameters disagree; "
            f"leaves with no torch key: {_listing(uncovered)}; table paths the model lacks: {_listing(unknown)}"
        )
    return layout, shapes


def _torch_shape(entry: _Param, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(reversed(flax_shape)) if entry.transposed else flax_shape


@functools.lru_cache(maxsize=8)
def _buffer_value(kind: str, shape: tuple[int, ...]) -> np.ndarray:
    """han-jax's value of a buffer (read-only: shared by every caller)."""
    if kind == "causal_mask":
        # torch.triu(torch.ones(L, L), diagonal=1).bool(): True = may NOT attend.
        value = np.triu(np.ones(shape, dtype=bool), k=1)
    else:
        value = sinusoidal_table(shape[-2], shape[-1]).reshape(shape)
    value.flags.writeable = False
    return value


def _as_numpy(value: Any) -> np.ndarray:
    """A numpy array from a numpy/JAX array or a torch tensor (bfloat16 widened to float32, exactly)."""
    if hasattr(value, "detach"):  # a torch tensor; torch itself is not imported here
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":  # numpy has no bfloat16
            value = value.float()
        return value.numpy()
    return np.asarray(value)


# ---------------------------------------------------------------------------
# state_dict <-> params.
# ---------------------------------------------------------------------------


def expected_state_dict_shapes(model_config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The torch state_dict (names and shapes, in the original's order) that ``model_config`` maps to."""
    layout, shapes = _checked_layout(model_config)
    return {
        e.torch_name: (_torch_shape(e, shapes[e.flax_path]) if isinstance(e, _Param) else e.shape) for e in layout
    }


def state_dict_to_params(state_dict: Mapping[str, Any], model_config: ModelConfig) -> dict:
    """Maps the original's model state_dict onto han-jax's Flax ``params``.

    Args:
      state_dict: ``{torch name: array}`` (numpy arrays, or torch tensors), e.g.
        :attr:`TorchCheckpoint.state_dict`.
      model_config: the architecture to fill, e.g. from :func:`infer_model_config`.

    Returns:
      The ``params`` tree of ``MultiResolutionHAN(model_config)`` (nested dicts
      of float32 numpy arrays), the tree ``model.init`` would create.

    Raises:
      CheckpointMismatch: a key is missing, unexpected or misshaped, a parameter
        is not floating point, or a buffer differs from han-jax's constant; the
        error names every such key (expected vs found shape).
    """
    layout, shapes = _checked_layout(model_config)
    wanted = {e.torch_name for e in layout}
    missing = [e.torch_name for e in layout if e.torch_name not in state_dict]
    unexpected = [k for k in state_dict if k not in wanted]
    misshaped, invalid, leaves = [], [], {}
    for entry in layout:
        if entry.torch_name not in state_dict:
            continue
        value = _as_numpy(state_dict[entry.torch_name])
        if isinstance(entry, _Buffer):
            expected_shape = entry.shape
        else:
            expected_shape = _torch_shape(entry, shapes[entry.flax_path])
        if value.shape != expected_shape:
            misshaped.append((entry.torch_name, expected_shape, value.shape))
            continue
        if isinstance(entry, _Buffer):
            reason = _buffer_problem(entry, value)
            if reason:
                invalid.append((entry.torch_name, reason))
            continue
        if not np.issubdtype(value.dtype, np.floating):
            invalid.append((entry.torch_name, f"dtype {value.dtype}, expected floating point"))
            continue
        value = value.astype(np.float32)
        leaves[entry.flax_path] = np.array(value.T if entry.transposed else value, order="C")
    if missing or unexpected or misshaped or invalid:
        raise CheckpointMismatch(
            "the state_dict does not match the model configuration" + _hint(unexpected),
            missing=missing, unexpected=unexpected, misshaped=misshaped, invalid=invalid,
        )
    return _unflatten({path: leaves[path] for path in shapes})


def _buffer_problem(entry: _Buffer, value: np.ndarray) -> Optional[str]:
    """Why a checkpoint buffer is not han-jax's constant (None when it is)."""
    expected = _buffer_value(entry.kind, entry.shape)
    if entry.kind == "causal_mask":
        if value.dtype != np.bool_:
            return f"dtype {value.dtype}, expected bool"
        if not np.array_equal(value, expected):
            return "not the causal mask triu(ones, 1) han-jax uses"
        return None
    if not np.issubdtype(value.dtype, np.floating):
        return f"dtype {value.dtype}, expected floating point"
    err = float(np.max(np.abs(value.astype(np.float64) - expected))) if value.size else 0.0
    if not err <= TABLE_ATOL:  # also catches NaN
        return f"differs from han-jax's sinusoidal table by {err:.3g} (> {TABLE_ATOL})"
    return None


def _hint(unexpected: Sequence[str]) -> str:
    """A pointer for unexpected keys of modules han-jax does not port."""
    if any(k.startswith("cross_temporal_attention.") for k in unexpected):
        return (" (cross_temporal_attention.*: the original's use_cross_temporal_attention=True, "
                "which han-jax does not port)")
    if any(k.startswith("daily_fusion.") and "geographic" in k for k in unexpected):
        return " (geographic daily fusion: the original's use_geographic_prior=True, which han-jax does not port)"
    return ""


def params_to_state_dict(params: Mapping[str, Any], model_config: ModelConfig) -> dict[str, np.ndarray]:
    """Han-jax ``params`` in the original's state_dict layout (the inverse of :func:`state_dict_to_params`).

    Args:
      params: the ``params`` tree of ``MultiResolutionHAN(model_config)`` (not
        the ``{"params": ...}`` variables dict).
      model_config: the architecture ``params`` belongs to.

    Returns:
      ``{torch name: numpy array}`` (float32 parameters) in the original's
      ``state_dict()`` order, buffers included (han-jax's tables and masks), ready for
      ``torch.nn.Module.load_state_dict`` after ``torch.from_numpy``.

    Raises:
      CheckpointMismatch: ``params`` lacks a leaf, has an extra one, or one of
        the wrong shape (named by its Flax path).
    """
    layout, shapes = _checked_layout(model_config)
    leaves = {path: np.asarray(value) for path, value in _flatten(params).items()}
    missing = sorted("/".join(p) for p in shapes if p not in leaves)
    unexpected = sorted("/".join(p) for p in leaves if p not in shapes)
    misshaped = sorted(
        ("/".join(p), shapes[p], leaves[p].shape) for p in shapes if p in leaves and leaves[p].shape != shapes[p]
    )
    if missing or unexpected or misshaped:
        raise CheckpointMismatch("the params do not match the model configuration",
                                 missing=missing, unexpected=unexpected, misshaped=misshaped)
    out = {}
    for entry in layout:
        if isinstance(entry, _Buffer):
            out[entry.torch_name] = _buffer_value(entry.kind, entry.shape).copy()
        else:
            value = leaves[entry.flax_path]  # float32 as in torch (a bfloat16 param policy widens exactly)
            out[entry.torch_name] = np.array(value.T if entry.transposed else value, dtype=np.float32, order="C")
    return out


# ---------------------------------------------------------------------------
# The configuration the weights were trained with.
# ---------------------------------------------------------------------------

# Fields the weights determine; a checkpoint config that records one must agree.
_SHAPE_FIELDS = ("d_model", "num_daily_layers", "num_monthly_layers", "num_fusion_layers", "num_temporal_layers")
# Fields only a config can tell (the original's names are han-jax's).
_CONFIG_FIELDS = ("nhead", "dropout")


def infer_model_config(state_dict: Mapping[str, Any], base: Optional[ModelConfig] = None, *,
                       checkpoint_config: Optional[Mapping[str, Any]] = None) -> ModelConfig:
    """The :class:`ModelConfig` of the original's state_dict, from its names and shapes.

    From the weights: ``d_model``, the daily and monthly sources (names and
    feature counts, in the original's order), the four layer counts,
    ``n_regime_classes``, ``use_latent_forecast`` and ``daily_forecast_horizon``,
    ``causal`` (the causal-mask buffers exist only when it was on),
    ``max_daily_len``, ``max_months`` and ``monthly_dim_feedforward``.

    Not in the weights: ``nhead`` and ``dropout`` come from
    ``checkpoint_config`` when it has them, else from ``base``; every other
    field (``local_window``, han-jax's switches) from ``base``. ``base=None``
    is ``ModelConfig()``, the original's training defaults (``nhead=8``).

    Args:
      state_dict: ``{torch name: array}``; values only need ``.shape`` (a tuple
        of ints is accepted too).
      base: supplies what the weights cannot determine.
      checkpoint_config: the checkpoint's own config dict, if any. ``nhead`` /
        ``dropout`` are taken from it; ``d_model`` and the layer counts, when
        present, must agree with the weights.

    Returns:
      The configuration; pass it to :func:`state_dict_to_params`, which checks
      every key and shape against it.

    Raises:
      CheckpointMismatch: a key the inference needs is missing, or the weights
        contradict each other or ``checkpoint_config``.
    """
    base = base if base is not None else ModelConfig()

    def shape(key: str) -> tuple[int, ...]:
        if key not in state_dict:
            raise CheckpointMismatch("cannot infer the model configuration from the state_dict", missing=[key])
        value = state_dict[key]
        return tuple(value) if isinstance(value, (tuple, list)) else tuple(value.shape)

    def sources(prefix: str, suffix: str, axis: int) -> tuple[tuple[str, int], ...]:
        # State_dict order is the original's ModuleDict order, which is the source order.
        pattern = re.compile(re.escape(prefix) + r"\.(.+)\." + re.escape(suffix))
        found = [(m.group(1), shape(k)[axis]) for k in state_dict if (m := pattern.fullmatch(k))]
        if not found:
            raise CheckpointMismatch("cannot infer the model configuration from the state_dict: no source",
                                     missing=[f"{prefix}.<source>.{suffix}"])
        return tuple(found)

    daily = sources("daily_encoders", "feature_projection.0.weight", 1)
    monthly = sources("monthly_encoder.source_encoders", "feature_embedding.weight", 0)
    d_model = shape("temporal_encoder.output_norm.weight")[0]
    fields: dict[str, Any] = dict(d_model=d_model, daily_sources=daily, monthly_sources=monthly)

    def count(prefixes: Iterable[str], what: str) -> int:
        counts = {p: _count_indices(state_dict, p) for p in prefixes}
        if len(set(counts.values())) != 1:
            raise CheckpointMismatch(
                f"cannot infer {what}: the modules disagree ({', '.join(f'{p}: {n}' for p, n in counts.items())})")
        return next(iter(counts.values()))

    fields["num_daily_layers"] = count([f"daily_encoders.{n}.transformer_encoder.layers" for n, _ in daily],
                                       "num_daily_layers")
    fields["num_monthly_layers"] = count([f"monthly_encoder.source_encoders.{n}.encoder_layers" for n, _ in monthly],
                                         "num_monthly_layers")
    # One number for three places in the original (docs/model.md section 1.1).
    fields["num_fusion_layers"] = count(
        ["daily_fusion.cross_attention_layers", "monthly_encoder.cross_source_attention",
         "cross_resolution_fusion.fusion_layers"], "num_fusion_layers")
    fields["num_temporal_layers"] = count(["temporal_encoder.transformer_encoder.layers"], "num_temporal_layers")
    fields["n_regime_classes"] = shape("regime_head.mlp.7.weight")[0]
    fields["causal"] = "temporal_encoder.causal_mask" in state_dict
    fields["max_daily_len"] = shape("daily_fusion.source_gate.temporal_encoding.position_embedding.weight")[0]
    fields["max_months"] = shape("monthly_aggregation.month_queries")[1]
    if fields["num_monthly_layers"]:
        first = monthly[0][0]
        fields["monthly_dim_feedforward"] = shape(
            f"monthly_encoder.source_encoders.{first}.encoder_layers.0.ffn.0.weight")[0]
    if "daily_forecast_head.horizon_embeddings.weight" in state_dict:
        fields["use_latent_forecast"] = True
        fields["daily_forecast_horizon"] = shape("daily_forecast_head.horizon_embeddings.weight")[0]
    elif "daily_forecast_head.forecast_net.7.weight" in state_dict:
        # DailyForecastingHead: Linear(hidden -> horizon * n_daily_features).
        out, n_daily = shape("daily_forecast_head.forecast_net.7.weight")[0], sum(f for _, f in daily)
        if out % n_daily:
            raise CheckpointMismatch(f"daily_forecast_head.forecast_net.7.weight has {out} outputs, not a multiple "
                                     f"of the {n_daily} daily features")
        fields["use_latent_forecast"] = False
        fields["daily_forecast_horizon"] = out // n_daily
    # else: no daily forecast head; state_dict_to_params names the keys han-jax needs.

    checkpoint_config = checkpoint_config or {}
    contradictions = [
        (k, f"checkpoint config says {checkpoint_config[k]!r}, the weights {fields[k]!r}")
        for k in _SHAPE_FIELDS if k in checkpoint_config and checkpoint_config[k] != fields[k]
    ]
    if contradictions:
        raise CheckpointMismatch("the checkpoint's config contradicts its weights", invalid=contradictions)
    for k in _CONFIG_FIELDS:
        if checkpoint_config.get(k) is not None:
            fields[k] = type(getattr(base, k))(checkpoint_config[k])
    config = dataclasses.replace(base, **fields)
    if config.d_model % config.nhead:
        raise CheckpointMismatch(f"d_model {config.d_model} is not divisible by nhead {config.nhead}; pass the "
                                 "original's nhead (base=ModelConfig(nhead=...) or the checkpoint config)")
    return config


def _count_indices(state_dict: Mapping[str, Any], prefix: str) -> int:
    """How many ``prefix.<i>.`` sub-modules there are (indices must be 0..n-1)."""
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    indices = {int(m.group(1)) for k in state_dict if (m := pattern.match(k))}
    if indices != set(range(len(indices))):
        raise CheckpointMismatch(f"{prefix}: layer indices {sorted(indices)} are not 0..n-1")
    return len(indices)


# ---------------------------------------------------------------------------
# Uncertainty weights.
# ---------------------------------------------------------------------------


def log_vars_from_loss_state(loss_state: Mapping[str, Any]) -> tuple[Optional[dict[str, float]], Optional[str]]:
    """han-jax ``log_vars`` from the trainer's ``multi_task_loss_state_dict``.

    Two layouts exist at 75d6392 (``docs/data.md`` section 6):

    * ``MultiTaskLoss`` (``--no-improved-training``, the loss the audit
      describes): ``log_vars.<task>`` are Kendall log-variances, exactly
      han-jax's ``log_vars``; kind ``"kendall"``.
    * ``AvailabilityGatedLoss(SoftplusKendallLoss)`` (the default, because
      ``--use-improved-training`` is on): ``base_loss.raw_scales.<task>`` (or
      ``raw_scales.<task>`` for a bare ``SoftplusKendallLoss``) with the task
      weighted by ``exp(-s) L + s``, ``s = softplus(raw)``. Mapped to
      ``log_var = softplus(raw)``: the same precision ``exp(-s)`` per task,
      hence the same relative task weights, in han-jax's
      ``0.5 exp(-lv) L + 0.5 lv`` (half the objective; han-jax also clips
      ``lv`` to [-2, 2] and adds its regulariser); kind ``"softplus_kendall"``.

    The original's task names are han-jax's (``han_jax.tasks.names()``).

    Returns:
      ``(log_vars, kind)``: ``{task: float}`` for the tasks the state holds
      (merge onto ``aggregate.init_log_vars()`` for a full set), or
      ``(None, None)`` for an empty state.

    Raises:
      CheckpointMismatch: keys of another layout, or unknown task names.
    """
    if not loss_state:
        return None, None
    layouts = {"log_vars.": "kendall", "base_loss.raw_scales.": "softplus_kendall", "raw_scales.": "softplus_kendall"}
    prefix = next((p for p in layouts if all(k.startswith(p) for k in loss_state)), None)
    if prefix is None:
        raise CheckpointMismatch(
            "multi_task_loss_state_dict: not MultiTaskLoss (log_vars.<task>) nor SoftplusKendallLoss "
            "(raw_scales.<task>, base_loss.raw_scales.<task>)", unexpected=sorted(loss_state))
    kind = layouts[prefix]
    values = {k[len(prefix):]: float(_as_numpy(v).reshape(())) for k, v in loss_state.items()}
    unknown = sorted(t for t in values if t not in tasks.names())
    if unknown:
        raise CheckpointMismatch(f"multi_task_loss_state_dict: unknown task(s); han-jax's tasks are "
                                 f"{list(tasks.names())}",
                                 unexpected=[f"{prefix}{t}" for t in unknown])
    if kind == "softplus_kendall":
        values = {t: float(np.logaddexp(0.0, v)) for t, v in values.items()}  # softplus, stable for large raw
    return values, kind


# ---------------------------------------------------------------------------
# Reading the file.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TorchCheckpoint:
    """What han-jax takes from one of the original's checkpoint files.

    Attributes:
      path: the file read.
      state_dict: the model's ``{torch name: numpy array}`` (parameters and
        buffers, in the file's order; bfloat16 widened to float32).
      log_vars: han-jax log-variances from ``multi_task_loss_state_dict``
        (:func:`log_vars_from_loss_state`), or None if the file has none.
      loss_kind: ``"kendall"``, ``"softplus_kendall"``, ``"unknown"`` (see
        ``strict_loss_state``) or None.
      loss_state_dict: the raw ``multi_task_loss_state_dict`` (None if absent).
      config: the checkpoint's own ``config`` entry, as saved (the trainer's is
        its optimiser settings, not the architecture), or None.
      epoch: the epoch the trainer saved at, or None.
      best_val_loss: the trainer's best validation loss (its Kendall-weighted
        total; ``docs/audit.md``), or None.
      metadata: the other top-level entries holding plain Python data
        (``train_history``, ``val_history``, ``fusion_metrics``, ...).
      not_imported: top-level entries left out: ``optimizer_state_dict`` and
        ``scheduler_state_dict`` (torch optimiser state; han-jax starts a fresh
        optax state), and any other entry holding tensors.
    """

    path: str
    state_dict: dict[str, np.ndarray]
    log_vars: Optional[dict[str, float]] = None
    loss_kind: Optional[str] = None
    loss_state_dict: Optional[dict[str, np.ndarray]] = None
    config: Optional[dict] = None
    epoch: Optional[int] = None
    best_val_loss: Optional[float] = None
    metadata: dict = dataclasses.field(default_factory=dict)
    not_imported: tuple[str, ...] = ()

    def model_config(self, base: Optional[ModelConfig] = None) -> ModelConfig:
        """:func:`infer_model_config` of this state_dict, with this checkpoint's config as hints."""
        return infer_model_config(self.state_dict, base, checkpoint_config=self.config)

    def params(self, model_config: Optional[ModelConfig] = None) -> dict:
        """:func:`state_dict_to_params` for ``model_config`` (default: :meth:`model_config`)."""
        return state_dict_to_params(self.state_dict, model_config or self.model_config())


def _import_torch():
    try:
        import torch
    except ImportError as err:
        raise ImportError(TORCH_INSTALL_HINT) from err
    return torch


def _is_tensor(torch, value: Any) -> bool:
    return isinstance(value, torch.Tensor)


def _holds_tensors(torch, value: Any) -> bool:
    if _is_tensor(torch, value):
        return True
    if isinstance(value, Mapping):
        return any(_holds_tensors(torch, v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_tensors(torch, v) for v in value)
    return False


def read_torch_checkpoint(path: str, *, trust_pickle: bool = False, strict_loss_state: bool = True) -> TorchCheckpoint:
    """Reads a checkpoint of the original trainer (or a bare model state_dict).

    Loads with ``torch.load(weights_only=True)``, torch's restricted unpickler
    that only rebuilds tensors and plain containers: a checkpoint file can
    otherwise run arbitrary code when loaded.

    Args:
      path: a ``.pt`` file written by the original's ``save_checkpoint``
        (``{"model_state_dict", "multi_task_loss_state_dict", ...}``) or by
        ``torch.save(model.state_dict())``.
      trust_pickle: if the restricted load fails (an entry pickled as some
        other Python object), load with ``weights_only=False``; only for files
        you trust.
      strict_loss_state: a ``multi_task_loss_state_dict`` of an unknown layout
        is an error; with False it is kept raw in ``loss_state_dict`` with
        ``log_vars=None`` and ``loss_kind="unknown"``.

    Returns:
      A :class:`TorchCheckpoint`.

    Raises:
      ImportError: torch is not installed (the message says how to install it).
      CheckpointFormatError: the file holds something else, or needs
        ``trust_pickle``.
      CheckpointMismatch: the loss state has an unknown layout (``strict_loss_state``).
    """
    torch = _import_torch()
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if not trust_pickle:
            raise CheckpointFormatError(
                f"{path}: torch.load(weights_only=True) refused an entry ({err}); if you trust this file, "
                "read it with trust_pickle=True (a full unpickle, which can run code from the file)"
            ) from err
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile) as err:  # not a file torch.save wrote
        detail = " ".join(str(err).split())[:160]
        raise CheckpointFormatError(f"{path}: not a torch checkpoint ({type(err).__name__}: {detail})") from err
    if not isinstance(obj, Mapping):
        raise CheckpointFormatError(f"{path}: holds a {type(obj).__name__}, not a checkpoint dict or state_dict")
    if "model_state_dict" not in obj:
        if obj and all(_is_tensor(torch, v) for v in obj.values()):
            return TorchCheckpoint(path=str(path), state_dict={k: _as_numpy(v) for k, v in obj.items()})
        raise CheckpointFormatError(
            f"{path}: neither the original trainer's checkpoint (no 'model_state_dict') nor a state_dict of tensors; "
            f"top-level keys: {_listing(sorted(map(str, obj)))}")

    for key in ("model_state_dict", "multi_task_loss_state_dict"):
        value = obj.get(key)
        if value is not None and not (isinstance(value, Mapping) and all(_is_tensor(torch, v) for v in value.values())):
            raise CheckpointFormatError(f"{path}: '{key}' holds a {type(value).__name__}; expected a state_dict "
                                        "(a dict of tensors)")
    state_dict = {k: _as_numpy(v) for k, v in obj["model_state_dict"].items()}
    loss_state = obj.get("multi_task_loss_state_dict")
    loss_state = None if loss_state is None else {k: _as_numpy(v) for k, v in loss_state.items()}
    try:
        log_vars, loss_kind = log_vars_from_loss_state(loss_state or {})
    except CheckpointMismatch:
        if strict_loss_state:
            raise
        log_vars, loss_kind = None, "unknown"
    known = {"model_state_dict", "multi_task_loss_state_dict", "config", "epoch", "best_val_loss"}
    metadata, not_imported = {}, []
    for key, value in obj.items():
        if key in known:
            continue
        if key in NOT_IMPORTED or _holds_tensors(torch, value):
            not_imported.append(key)
        else:
            metadata[key] = value
    config = obj.get("config")
    if config is not None and not isinstance(config, Mapping):
        not_imported.append("config")  # only with trust_pickle: some other object
    epoch, best = obj.get("epoch"), obj.get("best_val_loss")
    return TorchCheckpoint(
        path=str(path),
        state_dict=state_dict,
        log_vars=log_vars,
        loss_kind=loss_kind,
        loss_state_dict=loss_state,
        config=dict(config) if isinstance(config, Mapping) else None,
        epoch=None if epoch is None else int(epoch),
        best_val_loss=None if best is None else float(best),
        metadata=metadata,
        not_imported=tuple(not_imported),
    )


# ---------------------------------------------------------------------------
# A run folder from a checkpoint (``han-jax import-torch``).
# ---------------------------------------------------------------------------


def imported_log_vars(checkpoint: TorchCheckpoint, defaults: Mapping[str, Any]) -> tuple[dict, list]:
    """han-jax's ``{task: log-variance}`` from the checkpoint, and report lines.

    Args:
      checkpoint: the read checkpoint.
      defaults: the run's initial log-variances (``Objective.init_log_vars``), one per weighted task.

    Tasks the checkpoint has no log-variance for keep their prior (and say so); a checkpoint
    task han-jax does not weigh is an error, never dropped.
    """
    log_vars = {k: np.asarray(v, np.float32) for k, v in defaults.items()}
    if checkpoint.log_vars is None:
        return log_vars, ["log-variances: the checkpoint has no multi_task_loss_state_dict; han-jax's priors kept"]
    unknown = sorted(set(checkpoint.log_vars) - set(log_vars))
    if unknown:
        raise CheckpointMismatch("multi_task_loss_state_dict", unexpected=[f"log_vars.{t}" for t in unknown])
    for task, value in checkpoint.log_vars.items():
        log_vars[task] = np.asarray(value, np.float32)
    kept = [t for t in log_vars if t not in checkpoint.log_vars]
    lines = [f"log-variances ({checkpoint.loss_kind}): " + ", ".join(
        f"{t}={float(checkpoint.log_vars[t]):.4f}" for t in log_vars if t in checkpoint.log_vars)]
    if kept:
        lines.append(f"log-variances: none in the checkpoint for {kept}; han-jax's priors kept")
    return log_vars, lines


def import_run(checkpoint: TorchCheckpoint, run_dir: str, config, *, log=print):
    """Writes a run folder (:func:`han_jax.app.runs.write_run_folder`) holding the checkpoint's weights.

    The model configuration is inferred from the weights (:meth:`TorchCheckpoint.model_config`,
    ``config.model`` supplying what they do not fix); the data named by ``config.data`` must
    have the same sources and feature counts, and its training split gives the normalisation
    (the original fits its z-scores on its training split the same way). Nothing about the
    weights is changed: ``evaluate`` and ``predict`` then score the original's model through
    han-jax's shared path. The folder's lock (:func:`han_jax.app.run_folder.lock_run_dir`) is
    held throughout.

    Args:
      checkpoint: a read checkpoint (:func:`read_torch_checkpoint`).
      run_dir: a folder without checkpoints yet.
      config: a :class:`~han_jax.config.Config` giving the data and step settings.
      log: where report lines go.

    Returns:
      The run's :class:`~han_jax.training.spec.StepSpec`.

    Raises:
      CheckpointMismatch: the weights do not fit the inferred model, or the data's layout
        differs from the checkpoint's (the message names it).
    """
    with lock_run_dir(run_dir, "han-jax import-torch"):
        return _import_run(checkpoint, run_dir, config, log=log)


def _import_run(checkpoint: TorchCheckpoint, run_dir: str, config, *, log):
    """:func:`import_run`'s body, run while holding the folder's lock."""
    # The original's heads (no residual forecast, no daily state in the regime head), whatever the preset says.
    model = dataclasses.replace(checkpoint.model_config(base=config.model), forecast_residual=False,
                                regime_daily_state=False)
    data = config.data
    if data.source == "synthetic" or data.monthly_sources is not None:
        data = dataclasses.replace(data, daily_sources=model.daily_sources, monthly_sources=model.monthly_sources)
    else:
        data = dataclasses.replace(data, daily_sources=model.daily_sources)
    # The model's layout is checked against the data's as any user-given layout is (Resolved.model).
    config = config.replace(model=model, data=data)
    try:
        datasets, resolved = prepare(config, log=log)
    except ConfigError as e:
        raise CheckpointMismatch(f"data layout: the checkpoint's model does not fit the data: {e}") from None
    spec = StepSpec.of(config, resolved)
    params = jax.tree_util.tree_map(jnp.asarray, checkpoint.params(spec.model))
    log_vars, lines = imported_log_vars(checkpoint, spec.objective.init_log_vars(config.step.log_var_priors))
    for line in lines:
        log(line)
    log_vars = {k: jnp.asarray(v) for k, v in log_vars.items()}
    state = state_with_parameters(jax.random.PRNGKey(config.train.seed), spec, params, log_vars)
    meta = {"epoch": 0, "imported_from": os.path.abspath(checkpoint.path), "original_epoch": checkpoint.epoch,
            "original_best_val_loss": checkpoint.best_val_loss, "loss_kind": checkpoint.loss_kind,
            "not_imported": list(checkpoint.not_imported)}
    write_run_folder(run_dir, config, resolved, state, datasets.normalisation, datasets.layout, meta=meta)
    n = sum(int(np.prod(np.shape(x))) for x in jax.tree_util.tree_leaves(params))
    log(f"imported {len(checkpoint.state_dict)} tensors ({n:,} parameters) from {checkpoint.path} into {run_dir}")
    if checkpoint.not_imported:
        log("not imported (torch optimiser state; han-jax starts a fresh optax state): "
            f"{list(checkpoint.not_imported)}")
    return spec
