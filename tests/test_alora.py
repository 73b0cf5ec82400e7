"""Activated LoRA: trained through the launcher; before the invocation it is the base model, after it it is not."""

from __future__ import annotations

import pytest
import torch

TINY_ALORA = {
    "kind": "alora", "target": "zoo:target", "invocation": "\n### Code:\n", "prefix_tokens": 24, "answer_tokens": 12,
    "samples": 48, "steps": 15, "batch_size": 8, "lr": 0.003,
}


@pytest.fixture(scope="module")
def alora_artifact(tiny_zoo):
    from harness.core.paths import specsweep_home
    from training.artifacts import build_artifact, load_train_config

    request = load_train_config(TINY_ALORA, "alora", specsweep_home(), tiny_zoo)
    build_artifact(request, log=lambda message: None)
    return request


def test_alora_prefix_logits_equal_the_base_model_and_differ_after_invocation(alora_artifact, zoo_models, tiny_zoo):
    from harness.core.corpus import heldout_prompts
    from training.alora import invocation_ids, load_variant

    models, tokenizer = zoo_models
    alora = load_variant(alora_artifact.directory, alora_artifact.config, tiny_zoo, "alora", torch.device("cpu"))
    prefix = tokenizer(heldout_prompts("prose", 1, config=tiny_zoo.corpus)[0])["input_ids"]
    invocation = invocation_ids(tokenizer, TINY_ALORA["invocation"])
    ids = torch.tensor([prefix + invocation + prefix[:8]])
    with torch.no_grad():
        adapted = alora(input_ids=ids).logits[0]
        base = models.target.model(input_ids=ids).logits[0]
    start = len(prefix)
    assert torch.allclose(adapted[:start], base[:start], atol=1e-5)
    assert not torch.allclose(adapted[start:], base[start:], atol=1e-3)


def test_alora_and_lora_both_fit_the_task(alora_artifact):
    metrics = alora_artifact.manifest()["metrics"]
    for variant in ("alora", "lora"):
        assert metrics[variant]["train_after"] < metrics[variant]["train_before"], variant
