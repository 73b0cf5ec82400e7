"""Shared fixtures: a tiny zoo built once per test session in a temporary ``$SPECSWEEP_HOME``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml

TESTS = Path(__file__).parent
TINY_ZOO = yaml.safe_load((TESTS / "tiny_zoo.yaml").read_text())


@pytest.fixture(scope="session")
def specsweep_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("specsweep_home")
    previous = os.environ.get("SPECSWEEP_HOME")
    os.environ["SPECSWEEP_HOME"] = str(home)
    yield home
    if previous is None:
        os.environ.pop("SPECSWEEP_HOME", None)
    else:
        os.environ["SPECSWEEP_HOME"] = previous


@pytest.fixture(scope="session")
def tiny_zoo(specsweep_home):
    """The tiny zoo's config, built (once) under the session's ``$SPECSWEEP_HOME``."""
    from harness.core.zoo_spec import ZooConfig
    from training.zoo import build_zoo

    config = ZooConfig.from_dict(TINY_ZOO)
    build_zoo(config, log=lambda message: None)
    return config


@pytest.fixture(scope="session")
def zoo_models(tiny_zoo):
    """The tiny zoo's target, drafts and tokenizer, loaded in float32 on the CPU."""
    from harness.core.models import ModelSpec, load_model, load_tokenizer
    from strategies import ModelSet

    device = torch.device("cpu")
    target = load_model(ModelSpec("zoo:target"), tiny_zoo, device, "target")
    drafts = {name: load_model(ModelSpec(f"zoo:{name}"), tiny_zoo, device, name) for name in ("draft-1l", "draft-2l")}
    tokenizer = load_tokenizer(ModelSpec("zoo:target"), tiny_zoo)
    return ModelSet(target=target, drafts=drafts), tokenizer


@pytest.fixture(scope="session")
def zoo_prompts(tiny_zoo, zoo_models) -> list[list[int]]:
    """Token ids of held-out prompts from three zoo domains."""
    from harness.core.corpus import heldout_prompts

    _, tokenizer = zoo_models
    texts = []
    for domain in ("code", "prose", "math"):
        texts += heldout_prompts(domain, 2, config=tiny_zoo.corpus)
    return [tokenizer(text)["input_ids"] for text in texts]


def write_sweep(path: Path, **overrides) -> Path:
    """Write a small valid sweep file on the tiny zoo, with top-level ``overrides`` merged in."""
    sweep = {
        "name": "tiny",
        "zoo": TINY_ZOO,
        "models": {"target": "zoo:target", "drafts": {"small": "zoo:draft-1l"}, "device": "cpu"},
        "prompts": [{"name": "code", "source": "zoo:code", "count": 3}],
        "strategies": [{"name": "speculative", "params": {"draft": "small"}, "grid": {"gamma": [2, 3]}}],
        "run": {"max_new_tokens": 12, "warmup_prompts": 1, "workers": 1, "num_cpus": 2, "pairing": "shared"},
    }
    sweep.update(overrides)
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


@pytest.fixture(scope="module", autouse=True)
def ray_shut_down_after_module():
    """Leave no Ray instance behind a test module: training jobs and sweeps start one when none is running."""
    yield
    try:
        import ray
    except ImportError:  # a bare GPU image running the GPU-only tests
        return
    if ray.is_initialized():
        ray.shutdown()


def assert_stopped_in_the_last_step(trace, limit: int, eos: frozenset[int]) -> None:
    """The loop ended in the step that reached ``limit`` tokens or an EOS: every step before the last adds its
    accepted tokens plus one and stays short of the end, and the last step's span covers it. (``finish`` cuts
    tokens at EOS and the limit, so checking the tokens alone would not catch a loop that ran on.)"""
    spans = [step.accepted + 1 for step in trace.steps]
    before_last = sum(spans[:-1])
    assert before_last < trace.new_tokens <= before_last + spans[-1], (spans, trace.new_tokens)
    assert trace.new_tokens == limit or trace.tokens[-1] in eos


def eos_case(models, prompts: list[list[int]], limit: int = 40) -> tuple[list[int], list[int], int]:
    """A prompt, its greedy baseline tokens and a position >= 3 whose token appears there for the first time: that
    token stands in for an EOS the model emits there."""
    from strategies import Sampling, build

    for prompt in prompts:
        expected = build("autoregressive", {}, models).generate(prompt, limit, Sampling()).tokens
        stop = next((index for index in range(3, len(expected)) if expected[index] not in expected[:index]), None)
        if stop is not None:
            return prompt, expected, stop
    raise AssertionError("no prompt emits a fresh token after position 3")


def check_stops_at_the_first_eos(models, prompts: list[list[int]], name: str, params: dict) -> None:
    """Strategy ``name`` stops right after the first token standing in for an EOS (see ``eos_case``), with the
    baseline's tokens up to it, in the step that reached it."""
    from strategies import Sampling, build

    prompt, expected, stop = eos_case(models, prompts)
    target = models.target
    saved, target.eos_token_id = target.eos_token_id, frozenset({expected[stop]})  # "emits EOS" at `stop`
    try:
        trace = build(name, params, models).generate(prompt, 40, Sampling())
    finally:
        target.eos_token_id = saved
    assert trace.tokens == expected[:stop + 1]
    assert_stopped_in_the_last_step(trace, 40, frozenset({expected[stop]}))


@pytest.fixture
def no_start(monkeypatch):
    """Fail the test if a sweep starts (Ray, workers, models): bad input must be refused before that."""
    import transformers

    import harness.driver.scheduler

    def too_early(*args, **kwargs):
        raise AssertionError("the sweep started before validation finished")

    monkeypatch.setattr(harness.driver.scheduler, "run_sweep", too_early)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", too_early)
