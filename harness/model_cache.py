"""Models and tokenizers loaded once per worker and reused across cells (least recently used evicted first)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from harness.models import ModelSpec, load_model, load_tokenizer, pick_device


class ModelCache:
    """Holds ``CausalLM`` wrappers and tokenizers keyed by spec; counts loads."""

    def __init__(self, zoo_config: Any, device: str = "auto", max_models: int | None = None) -> None:
        self.zoo_config = zoo_config
        self.device = pick_device(device)
        self.max_models = max_models
        self.models: OrderedDict[tuple, Any] = OrderedDict()
        self.tokenizers: dict[tuple, Any] = {}
        self.loads: dict[str, int] = {}

    def model(self, spec: ModelSpec, name: str):
        """The ``CausalLM`` for ``spec``, loading it on first use."""
        key = (spec.id, spec.dtype, spec.revision)
        if key in self.models:
            self.models.move_to_end(key)
            return self.models[key]
        while self.max_models is not None and len(self.models) >= self.max_models:
            self.models.popitem(last=False)
        model = load_model(spec, self.zoo_config, self.device, name)
        self.models[key] = model
        self.loads[spec.id] = self.loads.get(spec.id, 0) + 1
        return model

    def tokenizer(self, spec: ModelSpec):
        """The tokenizer of ``spec``, loading it on first use."""
        key = (spec.id, spec.revision)
        if key not in self.tokenizers:
            self.tokenizers[key] = load_tokenizer(spec, self.zoo_config)
        return self.tokenizers[key]

    def holds(self, spec: ModelSpec) -> bool:
        return (spec.id, spec.dtype, spec.revision) in self.models
