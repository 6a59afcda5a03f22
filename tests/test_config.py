"""The configuration root: presets build on each other, config.json round-trips exactly."""

import dataclasses
import json

import pytest

from han_jax import config as configs
from han_jax.core.precision import Policy


@pytest.mark.parametrize("preset", sorted(configs.PRESETS))
def test_every_preset_round_trips_through_json(preset):
    config = configs.get_config(preset)
    text = json.dumps(configs.config_to_dict(config))
    again = configs.config_from_dict(json.loads(text))
    assert again == config and hash(again) == hash(config)


def test_round_trip_keeps_types_a_jitted_step_hashes_on():
    config = configs.tiny().replace(step=configs.StepConfig(
        policy=Policy.from_string("params=float32,compute=bfloat16,output=bfloat16")))
    config = config.replace(data=dataclasses.replace(config.data, daily_sources=("personnel", ("drones", 9))))
    again = configs.config_from_dict(json.loads(json.dumps(configs.config_to_dict(config))))
    assert again == config
    assert isinstance(again.step.policy, Policy) and again.step.policy.name == config.step.policy.name
    assert again.data.daily_sources == ("personnel", ("drones", 9))  # tuples, not lists
    layout = configs.config_to_dict(configs.Resolved(daily_sources=(("personnel", 12),), monthly_sources=()))
    assert isinstance(configs.config_from_dict(layout, configs.Resolved).daily_sources[0], tuple)


def test_presets_build_on_each_other():
    default, small, tiny = configs.default(), configs.small(), configs.tiny()
    # The model's source layout is the data's (Resolved), in every preset.
    assert default == configs.Config(model=configs.ModelConfig(daily_sources=None, monthly_sources=None))
    assert small.model == configs.ModelConfig.small(forecast_residual=True, regime_daily_state=True,
                                                    daily_sources=None, monthly_sources=None)
    assert not default.model.forecast_residual and not default.model.regime_daily_state  # the original's heads
    assert small.step.optim == dataclasses.replace(default.step.optim, learning_rate=1e-3, warmup_epochs=1,
                                                   accumulation_steps=1)
    assert tiny.step == small.step and tiny.model == dataclasses.replace(small.model, d_model=16, nhead=2)
    assert tiny.data == configs.DataConfig.small()


def test_unknown_field_is_named():
    data = configs.config_to_dict(configs.tiny())
    data["step"]["optim"]["learning_rat"] = 1.0
    with pytest.raises(ValueError, match=r"config\.step\.optim: unknown field\(s\) \['learning_rat'\]"):
        configs.config_from_dict(data)


def test_a_model_layout_given_by_the_user_must_be_the_data_s():
    resolved = configs.Resolved(daily_sources=(("personnel", 12),), monthly_sources=(("sentinel", 7),))
    model = configs.ModelConfig(daily_sources=None, monthly_sources=None)
    assert resolved.model(model).daily_sources == (("personnel", 12),)
    same = dataclasses.replace(model, monthly_sources=(("sentinel", 7),))
    assert resolved.model(same) == resolved.model(model)
    with pytest.raises(configs.ConfigError, match=r'model.monthly_sources=\[\["sentinel", 8\]\]: expected the '
                                                  r'data\'s layout \[\["sentinel", 7\]\]'):
        resolved.model(dataclasses.replace(model, monthly_sources=(("sentinel", 8),)))
