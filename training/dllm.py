"""D-LLM targets: a target fine-tuned to skip layers per token (Jiang et al. 2024), kind ``dllm``.

Execution routers (``harness.core.dllm.LayerRouters``, from layer ``start`` on) and a LoRA on the target are trained
together on text the machine has, through the Ray Train + DeepSpeed launcher. The forward is D-LLM's
(``harness.core.dllm.route_tokens``): straight-through Gumbel-softmax decisions per token and layer, the layer's output
mixed by them, skipped tokens masked out of later tokens' attention at that layer. The loss is

    CE(next token) + penalty * |activation ratio - ratio|

with D-LLM's defaults penalty 5 and ratio 0.5 (the share of routed token-layers that execute). The artefact is the
target with the LoRA merged (``model/``, a Hugging Face directory) and the routers (``routers.pt`` with
``routers.json``); ``load_dllm`` turns it into a ``harness.core.dllm.SkippingLM``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from harness.core.dllm import LayerRouters, SkippingLM, route_tokens
from harness.core.errors import ConfigError
from harness.core.models import ModelSpec, load_model, load_tokenizer
from training.artifacts import ArtifactKind
from training.eagle_data import FeatureDataConfig
from training.launch import launch
from training.settings import LoraSettings, check_ranges, mapping, parse_lora, parse_settings
from training.trainer import OptimSettings, Worker, mean_stats
from training.text import token_windows

MODEL_DIR = "model"
ROUTERS_FILE = "routers.pt"
ROUTERS_CONFIG = "routers.json"


@dataclass(frozen=True)
class DLLMTrainConfig(OptimSettings):
    """Everything that determines a D-LLM target (its hash names the artefact)."""

    target: ModelSpec = ModelSpec("zoo:target")
    start: int = 1  # the first routed layer
    router_rank: int = 32
    ratio: float = 0.5  # the activation ratio the penalty pulls towards
    penalty: float = 5.0  # λ
    tau: float = 1.0  # Gumbel-softmax temperature
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: FeatureDataConfig = field(default_factory=FeatureDataConfig)
    warmup_steps: int = 20
    eval_fraction: float = 0.05


def parse_dllm_config(raw: dict[str, Any], where: str, base_dir: Path, zoo_names: tuple[str, ...]) -> DLLMTrainConfig:
    """Validated D-LLM training settings from a training-config mapping (``kind: dllm``)."""
    config = parse_settings(DLLMTrainConfig, raw, where, base_dir, zoo_names, allowed_note="kind", fields={
        "data": lambda value, path: FeatureDataConfig.from_dict(mapping(value, path), path),
        "lora": parse_lora,
    })
    check_ranges(config, where, {"start": 0, "router_rank": 1})
    if not 0 < config.ratio <= 1:
        raise ConfigError(f"{where}.ratio", f"must be in (0, 1], got {config.ratio}", "e.g. 0.5: half the layers")
    if config.penalty < 0:
        raise ConfigError(f"{where}.penalty", f"must be >= 0, got {config.penalty}", "5 is D-LLM's default")
    if config.tau <= 0:
        raise ConfigError(f"{where}.tau", f"must be > 0, got {config.tau}", "1 is the usual Gumbel temperature")
    return config


class Trainee(torch.nn.Module):
    """The target under its LoRA and the routers, trained as one module."""

    def __init__(self, model: torch.nn.Module, routers: LayerRouters) -> None:
        super().__init__()
        self.model = model
        self.routers = routers


def dllm_loss(trainee: Trainee, ids: torch.Tensor, config: DLLMTrainConfig,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """CE + penalty · |activation ratio − ratio| on a batch of token windows; also the CE and the ratio."""
    logits, ratio = route_tokens(trainee.model, trainee.routers, ids, config.tau, generator)
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss = ce + config.penalty * (ratio - config.ratio).abs()
    return loss, {"loss": float(loss), "ce": float(ce), "ratio": float(ratio)}


def train_loop(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: tokenise the text, train routers and LoRA, report the directory."""
    from peft import get_peft_model

    worker = Worker.start(loop_config)
    config: DLLMTrainConfig = worker.config
    device = worker.device
    base = load_model(replace(config.target, dtype="float32"), worker.zoo, device, "target").model
    layers = base.config.num_hidden_layers
    if config.start >= layers:
        raise ConfigError("start", f"the target has {layers} layers, start is {config.start}", f"use < {layers}")
    tokenizer = load_tokenizer(config.target, worker.zoo)
    windows = token_windows(tokenizer, config.data, worker.zoo.corpus, base,
                            [config.target.as_dict(), loop_config["target_key"]])
    held_out = max(1, int(len(windows) * config.eval_fraction))
    train_rows, eval_rows = windows[held_out:], windows[:held_out].to(device)
    routers = LayerRouters(base.config.hidden_size, layers, config.start, config.router_rank)
    trainee = Trainee(get_peft_model(base, config.lora.peft_config()), routers).to(device)

    def evaluate(module: torch.nn.Module) -> dict[str, float]:
        stats = [dllm_loss(module, eval_rows[i:i + config.batch_size], config, torch.Generator().manual_seed(i))[1]
                 for i in range(0, len(eval_rows), config.batch_size)]
        return mean_stats(stats)

    def draw(generator: torch.Generator) -> torch.Tensor:
        return train_rows[torch.randint(0, len(train_rows), (config.batch_size,), generator=generator)].to(device)

    fitted = worker.fit(trainee, draw, lambda module, batch, generator: dllm_loss(module, batch, config, generator),
                        worker.generator(config.seed * 1000 + worker.rank), evaluate=evaluate,
                        progress="dllm", shown=("ce", "ratio"))
    module = fitted.module
    metrics = {"eval_before": fitted.before, "eval_after": fitted.after, "steps": config.steps, "start": config.start,
               "layers": layers, "world_size": worker.world}

    def write(directory: Path) -> None:
        module.eval()
        merged = module.model.merge_and_unload()
        merged.save_pretrained(str(directory / MODEL_DIR))
        tokenizer.save_pretrained(str(directory / MODEL_DIR))
        torch.save(module.routers.state_dict(), directory / ROUTERS_FILE)
        (directory / ROUTERS_CONFIG).write_text(json.dumps({
            "hidden_size": base.config.hidden_size, "layers": layers, "start": config.start,
            "rank": config.router_rank, "metrics": metrics}, indent=2))

    worker.finish(metrics, write)


def build_dllm(config: DLLMTrainConfig, zoo, out_dir: Path, target_key: str, name: str,
               log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train a D-LLM target for ``config`` into ``out_dir``; return its metrics."""
    return launch(train_loop, config, zoo, name, out_dir, log, target_key=target_key)


def load_dllm(directory: Path, device: torch.device, dtype: torch.dtype) -> SkippingLM:
    """The D-LLM target in ``directory`` as a ``SkippingLM`` on ``device`` in ``dtype``."""
    from transformers import AutoModelForCausalLM  # lazy: transformers

    settings = json.loads((directory / ROUTERS_CONFIG).read_text())
    routers = LayerRouters(settings["hidden_size"], settings["layers"], settings["start"], settings["rank"])
    routers.load_state_dict(torch.load(directory / ROUTERS_FILE, map_location="cpu", weights_only=True))
    model = AutoModelForCausalLM.from_pretrained(str(directory / MODEL_DIR), dtype=dtype).to(device)
    return SkippingLM(model, "dllm-target", routers)


KIND = ArtifactKind("dllm", parse_dllm_config, build_dllm,
                    lambda request, target: load_dllm(request.directory, target.device, target.dtype))
