"""SpecuLoRA's router: a bag-of-words feed-forward classifier that picks a domain for a prompt.

Features are the counts of the ``vocabulary`` most frequent words of the
training prompts (lower-cased ``\\w+`` tokens), scaled by ``log1p``; the
network is ``vocabulary -> 128 -> 64 -> n_domains`` with ReLUs. Training
prompts are cut from each domain's training documents; the held-out accuracy
is measured on prompts cut from held-out documents (for zoo domains, the same
prompts the sweeps use). Trained through the DeepSpeed launcher; saved as
``router.safetensors`` + ``router.json`` (vocabulary, domains, accuracy).
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from harness.core.corpus import DOMAINS, build_corpus, heldout_prompts
from harness.core.errors import ConfigError
from training.artifacts import ArtifactKind
from training.launch import launch
from training.settings import parse_domains, parse_settings
from training.trainer import LEGACY_ADAMW, OptimSettings, Worker
from training.text import source_texts

WORD = re.compile(r"\w+")
DEFAULT_DOMAINS = (("code", ("zoo:code",)), ("prose", ("zoo:prose",)), ("legal", ("zoo:legal",)), ("math", ("zoo:math",)))


@dataclass(frozen=True)
class RouterTrainConfig(OptimSettings):
    """Domains (name -> text sources), prompt sampling, network and optimisation settings."""

    domains: tuple[tuple[str, tuple[str, ...]], ...] = DEFAULT_DOMAINS
    vocabulary: int = 1000
    hidden: tuple[int, ...] = (128, 64)
    prompts_per_domain: int = 400
    heldout_per_domain: int = 50
    prompt_chars: int = 320
    steps: int = 300
    batch_size: int = 64
    lr: float = 3e-3
    schedule: str = "warmup_constant"
    weight_decay: float = 0.01
    adam_beta2: float = 0.999

    KEYED_ONLY_WHEN_SET: ClassVar[frozenset[str]] = LEGACY_ADAMW


def parse_router_config(raw: dict[str, Any], where: str, base_dir: Path, zoo_names: tuple[str, ...]) -> RouterTrainConfig:
    """Validated router-training settings from a training-config mapping (``kind: router``).

    A ``target`` key is accepted and ignored: a router reads text only, and a
    sweep binds every artefact to its target.
    """
    return parse_settings(RouterTrainConfig, raw, where, base_dir, zoo_names, allowed_note="kind", ignore=("target",),
                          fields={"domains": lambda value, path: parse_domains(value, path, minimum=2),
                                  "hidden": _widths})


def _widths(value: Any, path: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(v, int) and v > 0 for v in value):
        raise ConfigError(path, f"expected a list of layer widths, got {value!r}")
    return tuple(value)


def words(text: str) -> list[str]:
    return [word.lower() for word in WORD.findall(text)]


class BagOfWordsRouter(nn.Module):
    """``vocabulary -> hidden... -> n_domains`` over log-scaled word counts."""

    def __init__(self, vocabulary: list[str], domains: list[str], hidden: tuple[int, ...]) -> None:
        super().__init__()
        self.vocabulary = vocabulary
        self.index = {word: i for i, word in enumerate(vocabulary)}
        self.domains = domains
        widths = [len(vocabulary), *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(widths, widths[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(widths[-1], len(domains)))
        self.net = nn.Sequential(*layers)

    def featurize(self, texts: list[str]) -> torch.Tensor:
        features = torch.zeros(len(texts), len(self.vocabulary))
        for row, text in enumerate(texts):
            for word in words(text):
                column = self.index.get(word)
                if column is not None:
                    features[row, column] += 1
        return torch.log1p(features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)

    @torch.no_grad()
    def route(self, text: str) -> str:
        """The domain this router picks for ``text``."""
        parameter = next(self.parameters())
        logits = self(self.featurize([text]).to(parameter.device, parameter.dtype))
        return self.domains[int(logits.argmax(-1))]

    @torch.no_grad()
    def accuracy(self, texts: list[str], labels: list[int]) -> float:
        """The share of ``texts`` routed to their ``labels``' domains."""
        parameter = next(self.parameters())
        predicted = self(self.featurize(texts).to(parameter.device, parameter.dtype)).argmax(-1).cpu()
        return float((predicted == torch.tensor(labels)).float().mean())


def domain_prompts(config: RouterTrainConfig, zoo_corpus) -> tuple[list[str], list[int], list[str], list[int]]:
    """Training prompts cut from training documents and held-out prompts from held-out documents, with labels."""

    rng = random.Random(config.seed)
    train_texts, train_labels, held_texts, held_labels = [], [], [], []
    for label, (domain, sources) in enumerate(config.domains):
        documents: list[str] = []
        for source in sources:
            if source.startswith("zoo:") and source[4:] in DOMAINS:
                documents += [doc.text for doc in build_corpus(zoo_corpus)[source[4:]][0]]
                held_texts += heldout_prompts(source[4:], config.heldout_per_domain, config.prompt_chars, zoo_corpus)
                held_labels += [label] * (len(held_texts) - len(held_labels))
            else:
                documents += source_texts(source, "text", zoo_corpus)
        cuts = []
        for _ in range(config.prompts_per_domain):
            document = documents[rng.randrange(len(documents))]
            start = rng.randrange(max(1, len(document) - config.prompt_chars))
            cuts.append(document[start:start + config.prompt_chars])
        if not any(source.startswith("zoo:") for source in sources):
            held = max(1, len(cuts) // 10)
            held_texts += cuts[:held]
            held_labels += [label] * held
            cuts = cuts[held:]
        train_texts += cuts
        train_labels += [label] * len(cuts)
    return train_texts, train_labels, held_texts, held_labels


def train_loop(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: fit the router on domain prompts, report held-out accuracy and the weights."""
    from safetensors.torch import save_file

    worker = Worker.start(loop_config)
    config: RouterTrainConfig = worker.config
    texts, labels, held_texts, held_labels = domain_prompts(config, worker.zoo.corpus)
    counts = Counter(word for text in texts for word in words(text))
    vocabulary = [word for word, _ in counts.most_common(config.vocabulary)]
    router = BagOfWordsRouter(vocabulary, [d for d, _ in config.domains], config.hidden)
    features, targets = router.featurize(texts), torch.tensor(labels)

    def draw(generator: torch.Generator) -> torch.Tensor:
        return torch.randint(0, len(texts), (config.batch_size,), generator=generator)

    def loss(module: nn.Module, index: torch.Tensor, _: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        device = next(module.parameters()).device
        return nn.functional.cross_entropy(module(features[index].to(device)), targets[index].to(device)), {}

    fitted = worker.fit(router, draw, loss, worker.generator(config.seed),
                        evaluate=lambda module: {"accuracy": module.accuracy(held_texts, held_labels)})
    module = fitted.module.float().cpu().eval()
    metrics = {"heldout_accuracy": fitted.after["accuracy"], "untrained_accuracy": fitted.before["accuracy"],
               "heldout_prompts": len(held_texts), "train_prompts": len(texts)}

    def write(directory: Path) -> None:
        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(directory / "router.safetensors"))
        (directory / "router.json").write_text(json.dumps({
            "vocabulary": vocabulary, "domains": module.domains, "hidden": list(config.hidden), "metrics": metrics}))

    worker.finish(metrics, write)


def build_router(config: RouterTrainConfig, zoo, out_dir: Path, target_key: str, name: str,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train the router of ``config`` into ``out_dir``; return its metrics (held-out accuracy)."""
    return launch(train_loop, config, zoo, name, out_dir, log)


def load_router(directory: Path) -> BagOfWordsRouter:
    """A trained router from its artefact directory (on the CPU: routing is cheap)."""
    from safetensors.torch import load_file

    meta = json.loads((Path(directory) / "router.json").read_text())
    router = BagOfWordsRouter(meta["vocabulary"], meta["domains"], tuple(meta["hidden"]))
    router.load_state_dict(load_file(str(Path(directory) / "router.safetensors")))
    return router.eval()


KIND = ArtifactKind("router", parse_router_config, build_router, lambda request, target: load_router(request.directory))
