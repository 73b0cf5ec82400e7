"""The worker's model cache: models load once, and the least recently used is evicted over the memory budget."""

from __future__ import annotations

from harness.core.models import ModelSpec
from harness.driver.model_cache import ModelCache, model_bytes


def test_models_load_once_and_lru_is_evicted_over_budget(tiny_zoo):
    target, small, mid = ModelSpec("zoo:target"), ModelSpec("zoo:draft-1l"), ModelSpec("zoo:draft-2l")
    probe = ModelCache(tiny_zoo, "cpu")
    sizes = {spec.id: model_bytes(probe.model(spec, spec.id)) for spec in (target, small, mid)}
    cache = ModelCache(tiny_zoo, "cpu", max_bytes=sizes["zoo:target"] + sizes["zoo:draft-2l"])
    cache.model(target, "target")
    cache.model(mid, "mid")
    assert cache.model(target, "target") is cache.model(target, "target")  # reused, and now most recent
    cache.model(small, "small")  # over budget: evicts the least recently used (draft-2l), keeps the target
    assert cache.holds(target) and cache.holds(small) and not cache.holds(mid)
    assert cache.held_bytes() <= cache.max_bytes
    cache.model(mid, "mid")
    assert cache.loads == {"zoo:target": 1, "zoo:draft-2l": 2, "zoo:draft-1l": 1}


def test_an_early_exit_of_the_target_is_cached_as_its_own_model(tiny_zoo):
    cache = ModelCache(tiny_zoo, "cpu")
    target = cache.model(ModelSpec("zoo:target"), "target")
    exit_draft = cache.model(ModelSpec("zoo:target", layers=2), "exit-2l")
    assert exit_draft is not target
    assert len(target.model.get_decoder().layers) == 4 and len(exit_draft.model.get_decoder().layers) == 2
    assert cache.model(ModelSpec("zoo:target", layers=2), "exit-2l") is exit_draft
