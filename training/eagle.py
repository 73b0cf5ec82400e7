"""Training an EAGLE head on a target's features, on Ray Train workers with DeepSpeed.

Objective as in the EAGLE paper: for each position i the head sees the
target's feature f_i (plus uniform noise U(-noise, noise) during training)
and the embedding of token t_{i+1}, and predicts f_{i+1}. The loss is
``v_weight * SmoothL1(prediction, f_{i+1}) + p_weight * CE`` where CE is the
cross-entropy of ``lm_head(prediction)`` against the target's own next-token
distribution ``softmax(lm_head(f_{i+1}))`` (weights 1.0 and 0.1). The
reference code scales its noise by 512 / sequence length; we follow the
paper's fixed U(-0.1, 0.1).

On a real vocabulary the CE term dominates the cost: both distributions need
the full ``lm_head`` (49,152 x 576 on SmolLM2) for every position. With
``vocab_subset: N`` the CE is taken over the N tokens most frequent in the
training windows (both distributions renormalised there, as FR-Spec drafts),
and the saved head drafts from those tokens only; verification stays on the
full vocabulary, so decoding is still lossless.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from harness.core.errors import ConfigError
from harness.core.models import ModelSpec, load_model, load_tokenizer
from strategies.eagle_head import EagleHead, head_config, load_head_lm, save_head
from training.artifacts import ArtifactKind
from training.draft import frequent_tokens
from training.eagle_data import FeatureDataConfig, features_dir, worker_features
from training.launch import launch
from training.settings import check_ranges, mapping, parse_settings
from training.trainer import OptimSettings, Worker

PROBE_TOKENS = 8


@dataclass(frozen=True)
class EagleTrainConfig(OptimSettings):
    """Everything that determines a trained head (its hash names the artefact)."""

    target: ModelSpec = ModelSpec("zoo:target")
    data: FeatureDataConfig = field(default_factory=FeatureDataConfig)
    intermediate_size: int | None = None  # the head layer's MLP width; None = the target's
    vocab_subset: int = 0  # CE over, and drafting from, the N most frequent tokens (FR-Spec); 0 = full vocabulary
    steps: int = 600
    batch_size: int = 16
    warmup_steps: int = 30
    grad_clip: float = 0.5
    noise: float = 0.1
    v_weight: float = 1.0
    p_weight: float = 0.1
    eval_fraction: float = 0.05


def parse_eagle_config(raw: dict[str, Any], where: str, base_dir: Path, zoo_names: tuple[str, ...]) -> EagleTrainConfig:
    """Validated EAGLE training settings from a training-config mapping (``kind: eagle``)."""
    config = parse_settings(EagleTrainConfig, raw, where, base_dir, zoo_names, allowed_note="kind", fields={
        "data": lambda value, path: FeatureDataConfig.from_dict(mapping(value, path), path),
        "intermediate_size": _optional_width,
    })
    check_ranges(config, where, {"vocab_subset": 0})
    return config


def _optional_width(value: Any, path: str) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(path, f"expected a positive integer or null, got {value!r}")
    return value


# ---------------------------------------------------------------------------- the loss


def eagle_loss(head, batch: dict[str, torch.Tensor], config: EagleTrainConfig,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """EAGLE's loss on a batch of (input_ids, hidden, loss_mask); also the head's top-1 agreement with the target.

    The CE term and the agreement are over the head's vocabulary subset when it has one.
    """
    ids, hidden, mask = batch["input_ids"], batch["hidden"], batch["loss_mask"]
    dtype = head.fc.weight.dtype
    inputs = hidden[:, :-1]
    if config.noise > 0 and head.training:
        noise = torch.rand(inputs.shape, generator=generator, device="cpu").to(inputs.device)
        inputs = inputs + (noise * 2 - 1) * config.noise
    out = head(input_ids=ids[:, 1:], features=inputs.to(dtype), compute_logits=False)
    predicted = out.hidden_states[-1].float()
    wanted = hidden[:, 1:].float()
    weight = mask[:, 1:].float()
    denominator = weight.sum().clamp(min=1.0)
    v_loss = (F.smooth_l1_loss(predicted, wanted, reduction="none").mean(-1) * weight).sum() / denominator
    rows = head.subset_rows()  # built once per head; lm_head is frozen
    head_weight = head.lm_head.weight if rows is None else rows[1]
    with torch.no_grad():
        target_logits = F.linear(wanted.to(head_weight.dtype), head_weight).float()
        target_probs = torch.softmax(target_logits, dim=-1)
    logits = F.linear(out.hidden_states[-1].to(head_weight.dtype), head_weight).float()
    log_probs = torch.log_softmax(logits, dim=-1)
    p_loss = (-(target_probs * log_probs).sum(-1) * weight).sum() / denominator
    loss = config.v_weight * v_loss + config.p_weight * p_loss
    agree = ((logits.argmax(-1) == target_logits.argmax(-1)).float() * weight).sum() / denominator
    stats = {"loss": loss.item(), "v_loss": v_loss.item(), "p_loss": p_loss.item(), "top1": agree.item()}
    return loss, stats


# ---------------------------------------------------------------------------- the Ray Train loop


def training_head(target: torch.nn.Module, intermediate_size: int | None, subset: list[int] | None) -> EagleHead:
    """A fresh head for ``target``, over its own copies of the target's frozen embedding and LM head.

    DeepSpeed casts the module it trains (bf16 on GPU) in place; shared modules would cast the target's too.
    """
    return EagleHead(head_config(target.config, intermediate_size), copy.deepcopy(target.get_input_embeddings()),
                     copy.deepcopy(target.get_output_embeddings()), subset)


def train_loop(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: build or read the features, train the head, report it."""
    import datasets

    datasets.disable_progress_bars()
    worker = Worker.start(loop_config)
    config: EagleTrainConfig = worker.config
    rank, device = worker.rank, worker.device

    target = load_model(replace(config.target, dtype="float32"), worker.zoo, device, "target").model
    features = worker_features(worker, target, load_tokenizer(config.target, worker.zoo), config.data,
                               Path(loop_config["features_dir"]),
                               [config.target.as_dict(), loop_config["target_key"]], config.eval_fraction)
    eval_rows = features.eval_rows

    vocab = target.get_output_embeddings().weight.shape[0]
    subset = None
    if config.vocab_subset and config.vocab_subset < vocab:
        tokenizer = load_tokenizer(config.target, worker.zoo)
        train_ids = features.train.select_columns(["input_ids"])[:]["input_ids"]
        subset = frequent_tokens(torch.as_tensor(train_ids), vocab, config.vocab_subset, tokenizer)
    head = training_head(target, config.intermediate_size, subset).to(device)

    fitted = worker.fit(head, lambda generator: features.draw(generator, config.batch_size),
                        lambda module, batch, generator: eagle_loss(module, batch, config, generator),
                        worker.generator(config.seed * 1000 + rank),
                        evaluate=lambda module: eagle_loss(module, features.to_device(eval_rows), config)[1],
                        progress="eagle head", shown=("loss", "top1"))
    module = fitted.module
    metrics = {"eval_before": fitted.before, "eval_after": fitted.after, "train_loss_first": fitted.loss_first(),
               "train_loss_last": fitted.loss_last(), "steps": config.steps, "train_windows": len(features.train),
               "parameters": module.own_parameters()}

    def write(directory: Path) -> None:
        module.eval()
        probe = probe_drafts(module, target, eval_rows["input_ids"][0][:PROBE_TOKENS * 4])
        save_head(module, directory, extra={"metrics": metrics, "probe": probe})

    worker.finish(metrics, write)


@torch.no_grad()
def probe_drafts(head, target, ids: torch.Tensor) -> dict[str, list[int]]:
    """The head's greedy drafts along one window (target features from a batch-1 forward): a fingerprint
    that the saved and reloaded head must reproduce."""
    ids = ids[None].to(head.fc.weight.device)
    hidden = target(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    out = head(input_ids=ids[:, 1:], features=hidden[:, :-1])
    return {"input_ids": ids[0].tolist(), "argmax": out.logits[0].argmax(-1).tolist()}


# ---------------------------------------------------------------------------- the artefact


def build_head(config: EagleTrainConfig, zoo, out_dir: Path, target_key: str, name: str,
               log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train a head for ``config`` and write it (safetensors + ``head.json``) to ``out_dir``; return its metrics."""
    return launch(train_loop, config, zoo, name, out_dir, log,
                  features_dir=str(features_dir(config.target, target_key, config.data)), target_key=target_key)


KIND = ArtifactKind("eagle", parse_eagle_config, build_head,
                    lambda request, target: load_head_lm(request.directory, target))
