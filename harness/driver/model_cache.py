"""Models and tokenizers loaded once per worker and reused across cells, least recently used evicted first."""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any, Callable

from harness.core.lm import CausalLM
from harness.core.models import ModelSpec, load_model, load_tokenizer, pick_device
from harness.core.static_lm import compiled
from training.artifacts import load_artifact


def model_bytes(model) -> int:
    """Bytes held by a ``CausalLM``'s parameters and buffers."""
    tensors = [*model.model.parameters(), *model.model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


class ModelCache:
    """Holds ``CausalLM`` wrappers and tokenizers keyed by spec, within a memory budget; counts loads. ``clock``
    times every forward and run (a test injects a virtual one)."""

    def __init__(self, zoo_config: Any, device: str = "auto", max_bytes: int | None = None,
                 clock: Callable[[], float] = time.perf_counter, compile: bool = False) -> None:
        self.zoo_config = zoo_config
        self.compile = compile  # wrap every model and artefact on the static path (harness.core.static_lm)
        self.clock = clock  # what every model it loads times its forwards by, and the runner its runs
        self.device = pick_device(device)
        self.max_bytes = max_bytes
        self.models: OrderedDict[tuple, Any] = OrderedDict()
        self.tokenizers: dict[tuple, Any] = {}
        self.loads: dict[str, int] = {}
        self.artifacts: dict[tuple, Any] = {}

    @staticmethod
    def key(spec: ModelSpec) -> tuple:
        """Everything that makes two specs different models (an early exit of the target is not the target)."""
        return tuple(sorted((name, str(value)) for name, value in spec.as_dict().items()))

    def model(self, spec: ModelSpec, name: str):
        """The ``CausalLM`` for ``spec``, loading it on first use and evicting older models over budget."""
        key = self.key(spec)
        if key in self.models:
            self.models.move_to_end(key)
            return self.models[key]
        model = load_model(spec, self.zoo_config, self.device, name)
        model.clock = self.clock
        if self.compile:
            model = compiled(model)
        self.models[key] = model
        self.loads[spec.id] = self.loads.get(spec.id, 0) + 1
        self._evict(keep=key)
        return model

    def _evict(self, keep: tuple) -> None:
        if self.max_bytes is None:
            return
        while self.held_bytes() > self.max_bytes and len(self.models) > 1:
            oldest = next(key for key in self.models if key != keep)
            del self.models[oldest]
            self.artifacts = {key: value for key, value in self.artifacts.items() if key[1] != oldest}
            if self.device.type == "cuda":
                import torch

                torch.cuda.empty_cache()

    def held_bytes(self) -> int:
        return sum(model_bytes(model) for model in self.models.values())

    def tokenizer(self, spec: ModelSpec):
        """The tokenizer of ``spec``, loading it on first use."""
        key = (spec.id, spec.revision)
        if key not in self.tokenizers:
            self.tokenizers[key] = load_tokenizer(spec, self.zoo_config)
        return self.tokenizers[key]

    def artifact(self, request: Any, target_spec: ModelSpec) -> Any:
        """A trained artefact (``training.artifacts.ArtifactRequest``) loaded for the target of ``target_spec``."""

        key = (request.key(), self.key(target_spec))
        if key not in self.artifacts:
            artifact = load_artifact(request, self.model(target_spec, "target"))
            if isinstance(artifact, CausalLM):
                artifact.clock = self.clock
                if self.compile:
                    artifact = compiled(artifact)
            self.artifacts[key] = artifact
        return self.artifacts[key]

    def holds(self, spec: ModelSpec) -> bool:
        return self.key(spec) in self.models
