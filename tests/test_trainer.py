"""The trainer skeleton's settings: per-kind defaults, the schedules, range checks naming the field, and artefact
keys that change exactly when a setting that changes the training does."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from harness.core.errors import ConfigError, ConfigErrors
from harness.core.paths import content_hash
from training.adapters import AdapterTrainConfig
from training.alora import AloraTrainConfig
from training.artifacts import parse_train_config
from training.eagle import EagleTrainConfig
from training.router import RouterTrainConfig
from training.trainer import OptimSettings

ZOO_NAMES = ("target", "draft-1l", "draft-2l")


def parsed(raw: dict) -> OptimSettings:
    return parse_train_config(raw, "config", Path("."), ZOO_NAMES)[1]


def test_each_kind_keeps_the_optimiser_it_trained_with_before_the_skeleton():
    eagle, router = EagleTrainConfig(), RouterTrainConfig()
    assert (eagle.schedule, eagle.adam_beta2, eagle.weight_decay, eagle.grad_clip) == ("warmup_cosine", 0.95, 0.0, 0.5)
    # torch's AdamW defaults and a constant rate, as the router, aLoRA and adapters were trained
    assert (router.schedule, router.adam_beta2, router.weight_decay, router.warmup_steps) == ("warmup_constant", 0.999,
                                                                                              0.01, 0)
    assert AloraTrainConfig().schedule == AdapterTrainConfig().schedule == "warmup_constant"


def test_the_schedules_warm_up_then_decay_or_hold():
    cosine = OptimSettings(steps=10, lr=1.0, warmup_steps=2)
    assert [cosine.lr_at(step) for step in (0, 1)] == [0.5, 1.0]
    assert cosine.lr_at(2) == 1.0 and cosine.lr_at(9) == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))
    constant = OptimSettings(steps=10, lr=2.0, warmup_steps=4, schedule="warmup_constant")
    assert [constant.lr_at(step) for step in (0, 3, 9)] == [0.5, 2.0, 2.0]
    assert OptimSettings(lr=2.0, schedule="warmup_constant").lr_at(0) == 2.0


def test_a_setting_that_was_fixed_in_code_enters_the_key_only_when_set_away_from_it():
    plain = parsed({"kind": "router"})
    same = parsed({"kind": "router", "adam_beta2": 0.999, "schedule": "warmup_constant"})
    changed = parsed({"kind": "router", "adam_beta2": 0.98})
    assert "adam_beta2" not in plain.identity() and content_hash(plain.identity()) == content_hash(same.identity())
    assert changed.identity()["adam_beta2"] == 0.98
    assert content_hash(changed.identity()) != content_hash(plain.identity())
    # a nested config (SpaDec's head) follows the same rule
    spadec = parsed({"kind": "spadec", "head": {"kind": "eagle", "schedule": "warmup_constant"}})
    assert spadec.identity()["head"]["schedule"] == "warmup_constant"
    assert "schedule" not in parsed({"kind": "spadec"}).identity()["head"]
    # bfloat16 autocast on the CPU was added later: every kind's existing artefacts keep their keys
    for kind in ("eagle", "eagle3", "medusa", "draft", "router", "alora", "adapters"):
        assert "cpu_autocast" not in parsed({"kind": kind}).identity(), kind
        assert parsed({"kind": kind, "cpu_autocast": True}).identity()["cpu_autocast"] is True, kind


def test_optimiser_settings_out_of_range_are_refused_naming_each_field():
    with pytest.raises(ConfigErrors) as caught:
        parsed({"kind": "draft", "adam_beta1": 1.0, "schedule": "linear", "grad_clip": 0, "warmup_steps": -1})
    text = str(caught.value)
    for line in ("config.adam_beta1: must be in [0, 1), got 1.0", "config.schedule: unknown schedule 'linear'",
                 "warmup_cosine or warmup_constant", "config.grad_clip: must be > 0, got 0",
                 "config.warmup_steps: must be >= 0, got -1"):
        assert line in text
    with pytest.raises(ConfigError, match=r"config\.cpu_autocast: expected true or false, got 'yes please'"):
        parsed({"kind": "eagle3", "cpu_autocast": "yes please"})
    with pytest.raises(ConfigError, match=r"config\.weight_decay: must be >= 0"):
        parsed({"kind": "eagle", "weight_decay": -0.1})
