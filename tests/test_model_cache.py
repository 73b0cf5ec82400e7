"""The worker's model cache: models load once, and the least recently used is evicted over the memory budget."""

from __future__ import annotations

from harness.model_cache import ModelCache, model_bytes
from harness.models import ModelSpec


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
