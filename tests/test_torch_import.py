"""han_jax.app.torch_import: the original's checkpoints <-> han-jax params.

Everything but the last tests runs on numpy arrays, without torch. The original's
layout comes from ``tests/fixtures/original_state_dict`` (names and shapes of its
``state_dict()``, generated once from the original code; see the README there).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from han_jax import tasks
from han_jax.app import torch_import as ti
from han_jax.app.runs import load_run
from han_jax.config import SMALL_DAILY_SOURCES, SMALL_MONTHLY_SOURCES, ModelConfig
from han_jax.core.aggregate import aggregate, init_log_vars
from han_jax.model import MultiResolutionHAN
from han_jax.model.common import sinusoidal_table
from han_jax.testing import random_batch
from tests.helpers import tiny_config

TASK_NAMES = tasks.names()
PRIORS = {t.name: t.prior for t in tasks.tasks()}
FIXTURES = Path(__file__).parent / "fixtures" / "original_state_dict"
# The original's heads (han-jax's forecast_residual gain and regime_daily_state add weights it never had), on the
# tiny data's sources.
TINY = dataclasses.replace(tiny_config().model, forecast_residual=False, regime_daily_state=False,
                           daily_sources=SMALL_DAILY_SOURCES, monthly_sources=SMALL_MONTHLY_SOURCES)


def _fixture(name: str) -> dict:
    with open(FIXTURES / f"{name}.json") as f:
        return json.load(f)


def _fixture_shapes(fixture: dict) -> dict[str, tuple[int, ...]]:
    return {e["name"]: tuple(e["shape"]) for e in fixture["state_dict"]}


@functools.lru_cache(maxsize=None)
def _param_shapes(cfg: ModelConfig):
    """The params tree ``model.init`` creates, as ShapeDtypeStructs (computed here, not by the module under test)."""
    inputs, _ = random_batch(cfg, b=1, t=40, m=3)
    model = MultiResolutionHAN(config=cfg)
    return jax.eval_shape(lambda k: model.init({"params": k}, inputs, deterministic=True), jax.random.PRNGKey(1))[
        "params"]


def _random_params(cfg: ModelConfig, seed: int = 0):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda s: rng.standard_normal(s.shape, dtype=np.float32), _param_shapes(cfg))


def _state_dict_from_fixture(fixture: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Random parameters of the fixture's shapes; buffers with the original's values (built here, from their
    definitions in the original)."""
    rng = np.random.default_rng(seed)
    out = {}
    for e in fixture["state_dict"]:
        shape = tuple(e["shape"])
        if e["kind"] == "parameter":
            assert e["dtype"] == "float32"
            out[e["name"]] = rng.standard_normal(shape, dtype=np.float32)
        elif e["name"].endswith("causal_mask"):
            assert e["dtype"] == "bool"
            out[e["name"]] = np.triu(np.ones(shape, dtype=bool), k=1)
        else:  # sinusoidal tables: [1, L, D] or [L, D]
            out[e["name"]] = sinusoidal_table(shape[-2], shape[-1]).reshape(shape)
    return out


# --------------------------------------------------------------------------
# (a) round trips
# --------------------------------------------------------------------------


def test_tiny_round_trip_is_exact():
    params = _random_params(TINY)
    state_dict = ti.params_to_state_dict(params, TINY)
    back = ti.state_dict_to_params(state_dict, TINY)
    chex.assert_trees_all_equal(back, params)
    # And the reverse direction, through the state_dict again.
    again = ti.params_to_state_dict(back, TINY)
    assert list(again) == list(state_dict)
    chex.assert_trees_all_equal(again, state_dict)
    # The weights alone say what the config is; nhead, dropout and han-jax's switches come from base.
    assert ti.infer_model_config(state_dict, base=TINY) == TINY


def test_torch_layouts_of_linear_mha_conv_and_norm():
    params = _random_params(TINY, seed=3)
    sd = ti.params_to_state_dict(params, TINY)
    d = TINY.d_model
    # nn.Linear: weight [out, in] is the Flax kernel [in, out] transposed.
    kernel = params["casualty_head"]["mean_head"]["dense"]["kernel"]
    np.testing.assert_array_equal(sd["casualty_head.mean_head.weight"], kernel.T)
    assert sd["casualty_head.mean_head.weight"].shape == (3, d)
    # nn.MultiheadAttention: packed in_proj_weight [3D, D], rows q, k, v; q = x @ W[:D].T.
    attn = params["daily_fusion"]["source_gate"]["temporal_attention"]
    w = sd["daily_fusion.source_gate.temporal_attention.in_proj_weight"]
    assert w.shape == (3 * d, d)
    for i in range(3):
        np.testing.assert_array_equal(w[i * d:(i + 1) * d], attn["in_proj_kernel"][:, i * d:(i + 1) * d].T)
    np.testing.assert_array_equal(sd["daily_fusion.source_gate.temporal_attention.in_proj_bias"],
                                  attn["in_proj_bias"])
    # nn.Conv1d: weight [out, in, k] is the Flax kernel [k, in, out].
    conv = params["daily_temporal_encoder"]["multi_scale_conv_3"]["conv"]["kernel"]
    cw = sd["daily_temporal_encoder.multi_scale_conv.3.0.weight"]
    assert cw.shape == (d // 4, d, 28)
    np.testing.assert_array_equal(cw, np.transpose(conv, (2, 1, 0)))
    # LayerNorm / GroupNorm weight is Flax's scale.
    np.testing.assert_array_equal(sd["daily_temporal_encoder.multi_scale_conv.3.1.weight"],
                                  params["daily_temporal_encoder"]["multi_scale_norm_3"]["scale"])
    # Monthly encoders are keyed by name in torch, by position in han-jax.
    name = TINY.monthly_sources[1][0]
    np.testing.assert_array_equal(sd[f"monthly_encoder.source_encoders.{name}.cls_token"],
                                  params["monthly_encoder"]["source_encoders_1"]["cls_token"])


def test_mapping_is_the_same_with_vmapped_daily_stacks():
    # TINY's vmap_sources=None runs the daily stacks per source on CPU; True stacks them.
    params = _random_params(TINY, seed=1)
    sd = ti.params_to_state_dict(params, TINY)
    cfg = dataclasses.replace(TINY, vmap_sources=True)
    chex.assert_trees_all_equal(ti.state_dict_to_params(sd, cfg), params)
    chex.assert_trees_all_equal(ti.params_to_state_dict(params, cfg), sd)


# --------------------------------------------------------------------------
# (b) the original's default model
# --------------------------------------------------------------------------


@pytest.mark.slow
def test_original_default_state_dict_is_fully_consumed():
    fixture = _fixture("default")
    shapes = _fixture_shapes(fixture)
    assert fixture["n_parameters"] == 8_192_006
    # The weights' names and shapes give han-jax's default configuration.
    cfg = ti.infer_model_config(shapes)
    assert cfg == ModelConfig()
    # han-jax expects exactly the original's state_dict: same names, same order, same shapes.
    assert ti.expected_state_dict_shapes(cfg) == shapes
    assert list(ti.expected_state_dict_shapes(cfg)) == list(shapes)

    state_dict = _state_dict_from_fixture(fixture)
    params = ti.state_dict_to_params(state_dict, cfg)
    # Every Flax leaf filled, with the shape model.init gives.
    expected = _param_shapes(cfg)
    chex.assert_trees_all_equal_structs(params, expected)
    chex.assert_trees_all_equal_shapes(params, expected)
    assert sum(x.size for x in jax.tree_util.tree_leaves(params)) == fixture["n_parameters"]
    # Every parameter value lands somewhere once: the inverse gives the state_dict back exactly.
    chex.assert_trees_all_equal(ti.params_to_state_dict(params, cfg), state_dict)


def test_original_small_state_dict_is_fully_consumed():
    fixture = _fixture("small")
    shapes = _fixture_shapes(fixture)
    # The weights cannot tell the head count: without a hint it is base's (the default, 8).
    assert ti.infer_model_config(shapes).nhead == 8
    cfg = ti.infer_model_config(shapes, checkpoint_config={"nhead": 4, "dropout": 0.1, "batch_size": 8})
    assert cfg == ModelConfig.small()
    assert ti.expected_state_dict_shapes(cfg) == shapes
    params = ti.state_dict_to_params(_state_dict_from_fixture(fixture, seed=2), cfg)
    assert sum(x.size for x in jax.tree_util.tree_leaves(params)) == fixture["n_parameters"]


# --------------------------------------------------------------------------
# (c) errors name the key
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_state_dict():
    return ti.params_to_state_dict(_random_params(TINY, seed=4), TINY)


def test_missing_key_is_named(tiny_state_dict):
    sd = dict(tiny_state_dict)
    del sd["daily_fusion.source_gate.gate_projection.7.bias"]
    with pytest.raises(ti.CheckpointMismatch, match=r"missing key\(s\) \(1\): daily_fusion\.source_gate") as err:
        ti.state_dict_to_params(sd, TINY)
    assert err.value.missing == ["daily_fusion.source_gate.gate_projection.7.bias"]
    assert not err.value.unexpected and not err.value.misshaped


def test_unexpected_key_is_named(tiny_state_dict):
    sd = dict(tiny_state_dict, **{"cross_temporal_attention.scale_weights": np.ones(3, np.float32)})
    with pytest.raises(ti.CheckpointMismatch, match="unexpected key.*cross_temporal_attention.scale_weights") as err:
        ti.state_dict_to_params(sd, TINY)
    assert err.value.unexpected == ["cross_temporal_attention.scale_weights"]
    assert "use_cross_temporal_attention" in str(err.value)


def test_misshaped_key_names_expected_and_found_shape(tiny_state_dict):
    sd = dict(tiny_state_dict)
    key = "temporal_encoder.transformer_encoder.layers.0.linear1.weight"
    sd[key] = sd[key].T  # a Flax-layout kernel where torch's [out, in] is expected
    d = TINY.d_model
    with pytest.raises(ti.CheckpointMismatch, match=rf"{key} expected \[{4 * d}, {d}\] found \[{d}, {4 * d}\]"):
        ti.state_dict_to_params(sd, TINY)


def test_a_source_layout_the_config_lacks_is_reported(tiny_state_dict):
    other = dataclasses.replace(TINY, daily_sources=(("personnel", 12), ("drones", 10)))
    with pytest.raises(ti.CheckpointMismatch) as err:
        ti.state_dict_to_params(tiny_state_dict, other)
    assert err.value.misshaped == [("daily_encoders.drones.feature_projection.0.weight", (16, 10), (16, 9)),
                                   ("daily_encoders.drones.feature_embedding.weight", (10, 16), (9, 16))]


def test_buffers_must_equal_han_jax_constants(tiny_state_dict):
    sd = dict(tiny_state_dict)
    mask = "temporal_encoder.causal_mask"
    sd[mask] = ~sd[mask]
    table = "daily_temporal_encoder.sinusoidal_pe"
    sd[table] = sd[table] + 0.01
    with pytest.raises(ti.CheckpointMismatch) as err:
        ti.state_dict_to_params(sd, TINY)
    assert [k for k, _ in err.value.invalid] == [table, mask]
    # Rounding-level differences of the sinusoidal table (torch's f32 sin/cos) are accepted.
    sd = dict(tiny_state_dict, **{table: tiny_state_dict[table] + 1e-4})
    ti.state_dict_to_params(sd, TINY)


def test_non_float_parameter_is_rejected(tiny_state_dict):
    sd = dict(tiny_state_dict, **{"regime_head.mlp.7.bias": np.zeros(4, np.int64)})
    with pytest.raises(ti.CheckpointMismatch, match=r"regime_head\.mlp\.7\.bias: dtype int64"):
        ti.state_dict_to_params(sd, TINY)


def test_params_mismatch_is_named_by_flax_path():
    params = _random_params(TINY)
    del params["uncertainty_estimator"]["linear_1"]["dense"]["bias"]
    with pytest.raises(ti.CheckpointMismatch, match="uncertainty_estimator/linear_1/dense/bias"):
        ti.params_to_state_dict(params, TINY)


def test_infer_errors_name_the_key(tiny_state_dict):
    sd = dict(tiny_state_dict)
    del sd["temporal_encoder.output_norm.weight"]
    with pytest.raises(ti.CheckpointMismatch, match="temporal_encoder.output_norm.weight"):
        ti.infer_model_config(sd)
    with pytest.raises(ti.CheckpointMismatch, match="d_model: checkpoint config says 64"):
        ti.infer_model_config(tiny_state_dict, checkpoint_config={"d_model": 64})
    with pytest.raises(ti.CheckpointMismatch, match="d_model 16 is not divisible by nhead 3"):
        ti.infer_model_config(tiny_state_dict, checkpoint_config={"nhead": 3})
    sd = {k: v for k, v in tiny_state_dict.items() if not k.startswith("cross_resolution_fusion.fusion_layers.")}
    with pytest.raises(ti.CheckpointMismatch, match="num_fusion_layers: the modules disagree"):
        ti.infer_model_config(sd)


def test_infer_reads_the_variant_heads_and_causality(tiny_state_dict):
    cfg = dataclasses.replace(TINY, use_latent_forecast=False, daily_forecast_horizon=5, causal=False,
                              n_regime_classes=3)
    sd = ti.params_to_state_dict(_random_params(cfg), cfg)
    assert not any(k.endswith("causal_mask") for k in sd)
    assert ti.infer_model_config(sd, base=TINY) == cfg


# --------------------------------------------------------------------------
# (d) uncertainty weights
# --------------------------------------------------------------------------


def test_multi_task_loss_log_vars_are_han_jax_log_vars():
    state = {f"log_vars.{t}": np.float32(0.1 * i) for i, t in enumerate(TASK_NAMES)}
    log_vars, kind = ti.log_vars_from_loss_state(state)
    assert kind == "kendall"
    assert log_vars == {t: pytest.approx(0.1 * i) for i, t in enumerate(TASK_NAMES)}


def test_softplus_kendall_scales_map_to_the_same_task_weights():
    raw = {"casualty": -1.0, "regime": 0.0, "transition": 0.5, "anomaly": 1.2, "forecast": -3.0, "daily_forecast": 0.3}
    for prefix in ("base_loss.raw_scales.", "raw_scales."):
        log_vars, kind = ti.log_vars_from_loss_state({prefix + t: np.float32(v) for t, v in raw.items()})
        assert kind == "softplus_kendall"
        assert log_vars == {t: pytest.approx(math.log1p(math.exp(v))) for t, v in raw.items()}
    # The original weights task t by exp(-softplus(raw_t)); han-jax's weight is exp(-log_var_t).
    _, info = aggregate({t: jnp.float32(1.0) for t in TASK_NAMES}, {**init_log_vars(PRIORS), **log_vars})
    for t, v in raw.items():
        assert float(info.weight[t]) == pytest.approx(math.exp(-math.log1p(math.exp(v))), rel=1e-6)


def test_unknown_loss_layouts_and_tasks_are_named():
    assert ti.log_vars_from_loss_state({}) == (None, None)
    with pytest.raises(ti.CheckpointMismatch, match="log_vars.regim"):
        ti.log_vars_from_loss_state({"log_vars.regim": 1.0, "log_vars.casualty": 1.0})
    with pytest.raises(ti.CheckpointMismatch, match="lambdas.casualty"):
        ti.log_vars_from_loss_state({"log_vars.regime": 1.0, "lambdas.casualty": 1.0})


# --------------------------------------------------------------------------
# (e) the file itself
# --------------------------------------------------------------------------


def test_missing_torch_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
    with pytest.raises(ImportError, match=r'pip install -e "\.\[torch\]".*download\.pytorch\.org/whl/cpu'):
        ti.read_torch_checkpoint(str(tmp_path / "missing.pt"))


def test_reads_a_checkpoint_in_the_original_trainers_format(tmp_path):
    torch = pytest.importorskip("torch")
    import collections
    import fractions

    params = _random_params(TINY, seed=5)
    model_state = collections.OrderedDict(
        (k, torch.from_numpy(v)) for k, v in ti.params_to_state_dict(params, TINY).items())

    # The default loss at 75d6392: AvailabilityGatedLoss(base_loss=SoftplusKendallLoss(tasks)).
    class SoftplusKendall(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.raw_scales = torch.nn.ParameterDict(
                {t: torch.nn.Parameter(torch.tensor(0.1 * i)) for i, t in enumerate(TASK_NAMES)})

    class Gated(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.base_loss = SoftplusKendall()

    loss = Gated()
    optimizer = torch.optim.AdamW(loss.parameters(), lr=1e-4)
    sum(p.sum() for p in loss.parameters()).backward()
    optimizer.step()  # moments in the state, as in a real checkpoint
    checkpoint = {
        "epoch": 7,
        "model_state_dict": model_state,
        "optimizer_state_dict": optimizer.state_dict(),
        "scheduler_state_dict": {"last_epoch": 7, "base_lrs": [1e-4], "warmup_epochs": 10, "_last_lr": [7e-5]},
        "multi_task_loss_state_dict": loss.state_dict(),
        "best_val_loss": 55.85,
        "train_history": {"total": [9.0, 8.0]},
        "val_history": {"total": [60.0, 55.85]},
        "config": {"batch_size": 8, "accumulation_steps": 4, "learning_rate": 1e-4, "device": "cpu"},
    }
    path = tmp_path / "best_checkpoint.pt"
    torch.save(checkpoint, path)

    ckpt = ti.read_torch_checkpoint(str(path))
    assert list(ckpt.state_dict) == list(model_state)
    assert ckpt.model_config(base=TINY) == TINY
    chex.assert_trees_all_equal(ckpt.params(TINY), params)
    assert ckpt.loss_kind == "softplus_kendall"
    got = loss.base_loss.raw_scales
    assert ckpt.log_vars == {t: pytest.approx(float(torch.nn.functional.softplus(got[t].detach()))) for t in TASK_NAMES}
    assert ckpt.epoch == 7 and ckpt.best_val_loss == 55.85
    assert ckpt.config == checkpoint["config"]
    assert set(ckpt.metadata) == {"train_history", "val_history"}
    assert set(ckpt.not_imported) == {"optimizer_state_dict", "scheduler_state_dict"}

    # A bare state_dict (torch.save(model.state_dict())), here with a bfloat16 tensor.
    bare = collections.OrderedDict(model_state)
    key = "regime_head.mlp.7.weight"
    bare[key] = bare[key].to(torch.bfloat16)
    torch.save(bare, tmp_path / "bare.pt")
    ckpt = ti.read_torch_checkpoint(str(tmp_path / "bare.pt"))
    assert ckpt.log_vars is None and ckpt.epoch is None
    np.testing.assert_array_equal(ckpt.state_dict[key], bare[key].float().numpy())

    # An entry torch's restricted unpickler refuses needs trust_pickle.
    torch.save({**checkpoint, "note": fractions.Fraction(1, 3)}, tmp_path / "pickled.pt")
    with pytest.raises(ti.CheckpointFormatError, match="trust_pickle"):
        ti.read_torch_checkpoint(str(tmp_path / "pickled.pt"))
    ckpt = ti.read_torch_checkpoint(str(tmp_path / "pickled.pt"), trust_pickle=True)
    assert ckpt.metadata["note"] == fractions.Fraction(1, 3)

    # A loss of another layout stops the import unless asked to keep it raw.
    torch.save({**checkpoint, "multi_task_loss_state_dict": {"lambdas.regime": torch.tensor(1.0)}},
               tmp_path / "loss.pt")
    with pytest.raises(ti.CheckpointMismatch, match="lambdas.regime"):
        ti.read_torch_checkpoint(str(tmp_path / "loss.pt"))
    ckpt = ti.read_torch_checkpoint(str(tmp_path / "loss.pt"), strict_loss_state=False)
    assert (ckpt.log_vars, ckpt.loss_kind, list(ckpt.loss_state_dict)) == (None, "unknown", ["lambdas.regime"])

    torch.save({"weights": [1, 2]}, tmp_path / "other.pt")
    with pytest.raises(ti.CheckpointFormatError, match="top-level keys: weights"):
        ti.read_torch_checkpoint(str(tmp_path / "other.pt"))


@pytest.mark.slow
def test_import_run_writes_a_run_folder_that_loads_and_forwards_the_weights(tmp_path):
    config = tiny_config()
    # The original has no residual forecast path: the imported run must not add one.
    model = TINY
    params = jax.tree_util.tree_map(lambda x: 0.05 * x, _random_params(model, seed=3))
    state_dict = ti.params_to_state_dict(params, model)
    checkpoint = ti.TorchCheckpoint(path=str(tmp_path / "original.pt"), state_dict=state_dict,
                                    log_vars={"regime": 0.25, "forecast": -0.5}, loss_kind="kendall",
                                    not_imported=("optimizer_state_dict",))
    lines = []
    ti.import_run(checkpoint, str(tmp_path / "run"), config, log=lines.append)

    run = load_run(str(tmp_path / "run"))
    assert run.spec.model == model
    chex.assert_trees_all_equal(jax.device_get(run.state.params), params)
    assert float(run.state.log_vars["regime"]) == 0.25 and float(run.state.log_vars["forecast"]) == -0.5
    priors = init_log_vars(PRIORS, run.config.step.log_var_priors)
    assert float(run.state.log_vars["casualty"]) == float(priors["casualty"])
    assert any("priors kept" in line and "casualty" in line for line in lines)
    assert any("optimizer_state_dict" in line for line in lines)

    inputs, _ = random_batch(model, b=2, t=config.data.daily_seq_len, m=config.data.monthly_seq_len)
    want = MultiResolutionHAN(config=model).apply({"params": params}, inputs, deterministic=True)
    got = run.forward(inputs)
    chex.assert_trees_all_close({k: got[k] for k in want}, want, atol=1e-6)

    with pytest.raises(FileExistsError, match="checkpoints"):
        ti.import_run(checkpoint, str(tmp_path / "run"), config, log=lines.append)


def test_import_run_rejects_log_vars_of_unknown_tasks():
    checkpoint = ti.TorchCheckpoint(path="x.pt", state_dict={}, log_vars={"geography": 0.1}, loss_kind="kendall")
    with pytest.raises(ti.CheckpointMismatch, match="log_vars.geography"):
        ti.imported_log_vars(checkpoint, init_log_vars(PRIORS))
