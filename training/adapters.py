"""Domain LoRA adapters for a draft model (SpecuLoRA), trained per domain through the DeepSpeed launcher.

One job trains one peft LoRA per domain on the draft (defaults as SpecuLoRA:
r 4, alpha 16, dropout 0.1 on ``q_proj`` and ``v_proj``) and saves each with
``save_pretrained`` under ``<artefact>/<domain>/``. The objective is plain
next-token loss on the domain's text, or distillation towards the target's
next-token distribution on it (forward KL, as the zoo distils its drafts).
:func:`load_domain_adapters` loads every adapter once into one
``PeftModel`` over a private copy of the draft, switched with ``set_adapter``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F

from harness.core.errors import ConfigError
from harness.core.lm import CausalLM
from harness.core.models import ModelSpec, load_model, load_tokenizer
from training.artifacts import ArtifactKind
from training.launch import launch
from training.settings import LoraSettings, parse_domains, parse_settings
from training.trainer import LEGACY_ADAMW, OptimSettings, Worker
from training.text import token_windows

OBJECTIVES = ("next_token", "distill")
DEFAULT_DOMAINS = {"code": ("zoo:code",), "prose": ("zoo:prose",), "legal": ("zoo:legal",), "math": ("zoo:math",)}


@dataclass(frozen=True)
class DomainText:
    """The text of one domain: its sources and how it is windowed (see ``training.text.token_windows``)."""

    sources: tuple[str, ...]
    samples: int = 512
    seq_len: int = 128
    field: str = "text"
    seed: int = 0


@dataclass(frozen=True)
class AdapterTrainConfig(OptimSettings):
    """One LoRA per domain on ``draft``; ``target`` is the teacher for ``objective: distill``."""

    target: ModelSpec = ModelSpec("zoo:target")
    draft: ModelSpec = ModelSpec("zoo:draft-1l")
    domains: tuple[tuple[str, tuple[str, ...]], ...] = tuple(DEFAULT_DOMAINS.items())
    objective: str = "distill"
    lora: LoraSettings = field(default_factory=LoraSettings)
    samples: int = 512
    seq_len: int = 128
    batch_size: int = 16
    lr: float = 2e-3
    schedule: str = "warmup_constant"
    warmup_steps: int = 10
    weight_decay: float = 0.01
    adam_beta2: float = 0.999
    eval_fraction: float = 0.1

    KEYED_ONLY_WHEN_SET: ClassVar[frozenset[str]] = LEGACY_ADAMW - {"warmup_steps"}

    def domain_text(self, sources: tuple[str, ...]) -> DomainText:
        return DomainText(sources=sources, samples=self.samples, seq_len=self.seq_len, seed=self.seed)


def parse_adapter_config(raw: dict[str, Any], where: str, base_dir: Path, zoo_names: tuple[str, ...]) -> AdapterTrainConfig:
    """Validated adapter-training settings from a training-config mapping (``kind: adapters``)."""
    config = parse_settings(AdapterTrainConfig, raw, where, base_dir, zoo_names, allowed_note="kind",
                            fields={"domains": parse_domains})
    if config.objective not in OBJECTIVES:
        raise ConfigError(f"{where}.objective", f"unknown objective {config.objective!r}",
                          f"choose one of {', '.join(OBJECTIVES)}")
    for name in ("samples", "seq_len"):
        if getattr(config, name) < 1:
            raise ConfigError(f"{where}.{name}", f"must be >= 1, got {getattr(config, name)}")
    return config


def adapter_loss(model, teacher, batch: torch.Tensor, objective: str) -> torch.Tensor:
    """Next-token cross-entropy, or forward KL to ``teacher``'s next-token distribution."""
    logits = model(input_ids=batch).logits[:, :-1].float()
    if objective == "next_token":
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
    with torch.no_grad():
        teacher_logp = torch.log_softmax(teacher(input_ids=batch).logits[:, :-1].float(), dim=-1)
    logp = torch.log_softmax(logits, dim=-1)
    return (teacher_logp.exp() * (teacher_logp - logp)).sum(-1).mean()


def train_loop(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: train and save a LoRA for each domain, one after another."""
    from peft import get_peft_model

    worker = Worker.start(loop_config)
    config: AdapterTrainConfig = worker.config
    device, rank, world = worker.device, worker.rank, worker.world
    tokenizer = load_tokenizer(config.draft, worker.zoo)
    teacher = None
    if config.objective == "distill":
        teacher = load_model(replace(config.target, dtype="float32"), worker.zoo, device, "target").model.eval()
    metrics: dict[str, Any] = {}
    saved: dict[str, Any] = {}
    for domain, sources in config.domains:
        worker.seed()
        windows = token_windows(tokenizer, config.domain_text(sources), worker.zoo.corpus)
        held = max(1, int(len(windows) * config.eval_fraction))
        train_windows, eval_windows = windows[held:][rank::world], windows[:held].to(device)
        draft = load_model(replace(config.draft, dtype="float32"), worker.zoo, device, "draft").model
        model = get_peft_model(draft, config.lora.peft_config(), adapter_name=domain)
        fit_windows = train_windows[:32].to(device)

        def evaluate(module: torch.nn.Module) -> dict[str, float]:
            return {"eval": adapter_loss(module, teacher, eval_windows, config.objective).item(),
                    "train": adapter_loss(module, teacher, fit_windows, config.objective).item()}

        def draw(generator: torch.Generator) -> torch.Tensor:
            return train_windows[torch.randint(0, len(train_windows), (config.batch_size,),
                                               generator=generator)].to(device)

        fitted = worker.fit(model, draw, lambda module, batch, _: (adapter_loss(module, teacher, batch,
                                                                                config.objective), {}),
                            worker.generator(config.seed + rank), evaluate=evaluate)
        metrics[domain] = {"eval_before": fitted.before["eval"], "eval_after": fitted.after["eval"],
                           "train_before": fitted.before["train"], "train_after": fitted.after["train"]}
        saved[domain] = fitted.module
        if rank == 0:
            print(f"adapter {domain}: {config.objective} eval loss {fitted.before['eval']:.4f} -> "
                  f"{fitted.after['eval']:.4f}", flush=True)

    def write(directory: Path) -> None:
        for domain, model in saved.items():
            model.save_pretrained(str(directory / domain), selected_adapters=[domain])
        (directory / "adapters.json").write_text(json.dumps({"domains": [d for d, _ in config.domains],
                                                             "metrics": metrics}, indent=2))

    worker.finish({"domains": metrics}, write)


def build_adapters(config: AdapterTrainConfig, zoo, out_dir: Path, target_key: str, name: str,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train the domain adapters of ``config`` into ``out_dir``; return their metrics."""
    return launch(train_loop, config, zoo, name, out_dir, log)


class DomainAdapters:
    """All domain adapters in one ``PeftModel`` over a private copy of the draft (in ``dtype``, the target's);
    ``activate`` switches them."""

    def __init__(self, directory: Path, config: AdapterTrainConfig, zoo, device, dtype: str = "float32") -> None:
        from peft import PeftModel


        meta = json.loads((Path(directory) / "adapters.json").read_text())
        self.domains: list[str] = meta["domains"]
        draft = load_model(replace(config.draft, dtype=dtype), zoo, device, "draft").model
        first, *rest = self.domains
        model = PeftModel.from_pretrained(draft, str(Path(directory) / first / first), adapter_name=first)
        for domain in rest:
            model.load_adapter(str(Path(directory) / domain / domain), adapter_name=domain)
        self.model = model.eval()
        self.lm = CausalLM(self.model, name="draft+lora", num_parameters=sum(p.numel() for p in draft.parameters()))
        self.active: str | None = first

    def activate(self, domain: str | None) -> None:
        """Use ``domain``'s adapter for drafting, or none (the plain draft)."""
        if domain == self.active:
            return
        if domain is None:
            self.model.base_model.disable_adapter_layers()
        else:
            if domain not in self.domains:
                raise KeyError(f"no adapter for domain {domain!r}; have {', '.join(self.domains)}")
            self.model.base_model.enable_adapter_layers()
            self.model.set_adapter(domain)
        self.active = domain


KIND = ArtifactKind("adapters", parse_adapter_config, build_adapters,
                    lambda request, target: DomainAdapters(request.directory, request.config, request.zoo, target.device,
                                                           str(target.dtype).removeprefix("torch.")))
