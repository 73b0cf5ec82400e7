"""Activated LoRA (Greenewald et al. 2025) next to a plain LoRA, trained for the same task on the target.

The task: after some conversation text (``prefix_sources``) comes the
``invocation`` string, and the adapter should continue with text of
``answer_sources`` (on the zoo: prose, then ``### Code:``, then code). Both
adapters train on the same sequences with the loss on the answer tokens
only. The aLoRA (peft's ``alora_invocation_tokens``) changes nothing before
the invocation, so a conversation's KV cache from the base model stays valid
when the adapter is invoked; the plain LoRA changes every position, so the
whole prefix must be recomputed. Saved as ``alora/`` and ``lora/``
(``save_pretrained``) in one artefact.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F

from harness.core.errors import ConfigError
from harness.core.models import ModelSpec, load_model, load_tokenizer
from training.adapters import DomainText
from training.artifacts import ArtifactKind
from training.launch import launch
from training.settings import LoraSettings, parse_settings
from training.trainer import LEGACY_ADAMW, OptimSettings, Worker
from training.text import token_windows

VARIANTS = ("alora", "lora", "draft_alora")  # aLoRA and LoRA on the target, aLoRA on the draft


@dataclass(frozen=True)
class AloraTrainConfig(OptimSettings):
    """The invocation task and the adapters' settings."""

    target: ModelSpec = ModelSpec("zoo:target")
    draft: ModelSpec = ModelSpec("zoo:draft-1l")  # gets its own aLoRA, to draft the adapter turn speculatively
    invocation: str = "\n### Code:\n"
    prefix_sources: tuple[str, ...] = ("zoo:prose",)
    answer_sources: tuple[str, ...] = ("zoo:code",)
    prefix_tokens: int = 64
    answer_tokens: int = 32
    samples: int = 256
    lora: LoraSettings = field(default_factory=lambda: LoraSettings(r=8, alpha=16, dropout=0.0,
                                                                    target_modules=("q_proj", "k_proj", "v_proj")))
    steps: int = 120
    lr: float = 3e-3
    schedule: str = "warmup_constant"
    weight_decay: float = 0.01
    adam_beta2: float = 0.999

    KEYED_ONLY_WHEN_SET: ClassVar[frozenset[str]] = LEGACY_ADAMW


def parse_alora_config(raw: dict[str, Any], where: str, base_dir: Path, zoo_names: tuple[str, ...]) -> AloraTrainConfig:
    """Validated settings from a training-config mapping (``kind: alora``)."""
    config = parse_settings(AloraTrainConfig, raw, where, base_dir, zoo_names, allowed_note="kind")
    if not config.invocation.strip():
        raise ConfigError(f"{where}.invocation", f"expected a non-empty string, got {config.invocation!r}")
    return config


def invocation_ids(tokenizer, invocation: str) -> list[int]:
    """The invocation string's token ids, as they appear inside a sequence."""
    return list(tokenizer(invocation, add_special_tokens=False)["input_ids"])


def task_sequences(tokenizer, config: AloraTrainConfig, zoo_corpus) -> tuple[torch.Tensor, int]:
    """``[samples, prefix + invocation + answer]`` token rows, and where the answer starts."""

    def windows(sources: tuple[str, ...], length: int, seed: int) -> torch.Tensor:
        return token_windows(tokenizer, DomainText(sources, config.samples, length, seed=seed), zoo_corpus)

    invocation = torch.tensor(invocation_ids(tokenizer, config.invocation))
    prefixes = windows(config.prefix_sources, config.prefix_tokens, config.seed)
    answers = windows(config.answer_sources, config.answer_tokens, config.seed + 1)
    rows = torch.cat([prefixes, invocation.expand(config.samples, -1), answers], dim=1)
    return rows, config.prefix_tokens + len(invocation)


def answer_loss(model, rows: torch.Tensor, answer_start: int) -> torch.Tensor:
    """Next-token loss on the answer tokens only."""
    logits = model(input_ids=rows).logits[:, answer_start - 1:-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), rows[:, answer_start:].reshape(-1))


def train_loop(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: train the aLoRA and the plain LoRA on the same rows, save both."""
    from peft import get_peft_model

    worker = Worker.start(loop_config)
    config: AloraTrainConfig = worker.config
    device = worker.device
    tokenizer = load_tokenizer(config.target, worker.zoo)
    rows, answer_start = task_sequences(tokenizer, config, worker.zoo.corpus)
    held = max(1, len(rows) // 10)
    train_rows, eval_rows = rows[held:], rows[:held].to(device)
    fit_rows = train_rows[:32].to(device)
    metrics: dict[str, Any] = {"answer_start": answer_start}
    saved = {}

    def evaluate(module: torch.nn.Module) -> dict[str, float]:
        return {"eval": answer_loss(module, eval_rows, answer_start).item(),
                "train": answer_loss(module, fit_rows, answer_start).item()}

    def draw(generator: torch.Generator) -> torch.Tensor:
        return train_rows[torch.randint(0, len(train_rows), (config.batch_size,), generator=generator)].to(device)

    for variant in VARIANTS:
        worker.seed()
        spec = config.draft if variant == "draft_alora" else config.target
        base = load_model(replace(spec, dtype="float32"), worker.zoo, device, variant).model
        activated = variant in ("alora", "draft_alora")
        extra = {"alora_invocation_tokens": invocation_ids(tokenizer, config.invocation)} if activated else {}
        fitted = worker.fit(get_peft_model(base, config.lora.peft_config(**extra)), draw,
                            lambda module, batch, _: (answer_loss(module, batch, answer_start), {}),
                            worker.generator(config.seed), evaluate=evaluate)
        metrics[variant] = {"eval_before": fitted.before["eval"], "eval_after": fitted.after["eval"],
                            "train_before": fitted.before["train"], "train_after": fitted.after["train"]}
        saved[variant] = fitted.module

    def write(directory: Path) -> None:
        for variant, model in saved.items():
            model.save_pretrained(str(directory / variant))
        (directory / "alora.json").write_text(json.dumps({"metrics": metrics, "invocation": config.invocation}))

    worker.finish(metrics, write)


def build_alora(config: AloraTrainConfig, zoo, out_dir: Path, target_key: str, name: str,
                log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train the aLoRA and the LoRA of ``config`` into ``out_dir``; return their losses."""
    return launch(train_loop, config, zoo, name, out_dir, log)


def load_variant(directory: Path, config: AloraTrainConfig, zoo, variant: str, device):
    """A private copy of the target (or, for ``draft_alora``, the draft) with that adapter of ``directory``."""
    from peft import PeftModel


    spec = config.draft if variant == "draft_alora" else config.target
    base = load_model(spec, zoo, device, variant).model
    return PeftModel.from_pretrained(base, str(Path(directory) / variant)).eval()


class Activated(torch.nn.Module):
    """An aLoRA model whose adapter is active on every position of each call.

    For continuing a sequence whose invocation has been seen: peft looks for
    the invocation inside each call's ``input_ids``, so without this, cached
    one-token decoding steps after the invocation would run the base weights.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config
        self.generation_config = getattr(model, "generation_config", None)

    def forward(self, input_ids: torch.Tensor, **kwargs: Any):
        return self.model(input_ids=input_ids, alora_offsets=[input_ids.shape[1]] * input_ids.shape[0], **kwargs)


def load_variants(request: Any, target: Any) -> dict[str, Any]:
    """Every variant of a built aLoRA artefact, loaded onto the target's device."""
    return {variant: load_variant(request.directory, request.config, request.zoo, variant, target.device)
            for variant in VARIANTS}


KIND = ArtifactKind("alora", parse_alora_config, build_alora, load_variants)
