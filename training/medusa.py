"""Training Medusa-1 heads on a frozen target's features, through the trainer skeleton (Ray Train + DeepSpeed).

Medusa-1: the target stays frozen; head k (0-based) at position t is trained with cross-entropy against the
token at t + k + 2 of the training text, the heads' losses weighted ``decay ** k`` and summed (the paper's
λ_k = 0.8^k; the reference's Medusa-1 script sums them unweighted, its Medusa-2 fork weights them 0.8^k). The
text is the target's own (``answers:<source>``, its self-generated chat; or the zoo's text for the zoo target),
and the features are the target's last hidden states after the final norm, the same feature dataset EAGLE trains
on (``training.eagle_data``), shared on disk when the data settings are equal. After training, each head's rank
accuracies on the held-out windows are measured and saved with the heads (Medusa's sparse-tree calibration)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from harness.core.errors import ConfigError
from harness.core.models import ModelSpec, load_model, load_tokenizer
from strategies.medusa_heads import MedusaHeads, load_heads, save_heads
from training.artifacts import ArtifactKind
from training.eagle_data import FeatureDataConfig, features_dir, worker_features
from training.launch import launch
from training.settings import check_ranges, mapping, parse_settings
from training.trainer import OptimSettings, Worker


@dataclass(frozen=True)
class MedusaTrainConfig(OptimSettings):
    """Everything that determines trained Medusa heads (its hash names the artefact)."""

    target: ModelSpec = ModelSpec("zoo:target")
    data: FeatureDataConfig = field(default_factory=FeatureDataConfig)
    num_heads: int = 4
    num_layers: int = 1
    decay: float = 0.8
    steps: int = 600
    batch_size: int = 16
    lr: float = 1e-3
    warmup_steps: int = 30
    eval_fraction: float = 0.05


def parse_medusa_config(raw: dict[str, Any], where: str, base_dir: Path, zoo_names: tuple[str, ...]
                        ) -> MedusaTrainConfig:
    """Validated Medusa training settings from a training-config mapping (``kind: medusa``)."""
    config = parse_settings(MedusaTrainConfig, raw, where, base_dir, zoo_names, allowed_note="kind", fields={
        "data": lambda value, path: FeatureDataConfig.from_dict(mapping(value, path), path),
    })
    check_ranges(config, where, {"num_heads": 1, "num_layers": 1})
    if not 0 < config.decay <= 1:
        raise ConfigError(f"{where}.decay", f"must be in (0, 1], got {config.decay}", "Medusa uses 0.8")
    return config


def head_terms(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, k: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Head ``k``'s masked cross-entropy sum, correct top-1 count and weight on one batch (``None`` if the
    windows are too short for it)."""
    shift = k + 2
    if ids.shape[1] <= shift:
        return None
    predicted = logits[k, :, :-shift].float()
    wanted, weight = ids[:, shift:], mask[:, shift:]
    loss_sum = (F.cross_entropy(predicted.transpose(1, 2), wanted, reduction="none") * weight).sum()
    correct = ((predicted.argmax(-1) == wanted).float() * weight).sum()
    return loss_sum, correct, weight.sum()


def medusa_loss(heads: MedusaHeads, batch: dict[str, torch.Tensor], decay: float
                ) -> tuple[torch.Tensor, dict[str, float]]:
    """Medusa-1's loss on a batch of (input_ids, hidden, loss_mask), and each head's top-1 accuracy."""
    ids, hidden, mask = batch["input_ids"], batch["hidden"], batch["loss_mask"].float()
    logits = heads(hidden.to(heads.heads[0][-1].weight.dtype))  # [heads, batch, seq, vocab]
    total = torch.zeros((), device=hidden.device)
    stats: dict[str, float] = {}
    for k in range(heads.num_heads):
        terms = head_terms(logits, ids, mask, k)
        if terms is None:
            break
        loss_sum, correct, weight = terms
        denominator = weight.clamp(min=1.0)
        total = total + decay ** k * loss_sum / denominator
        stats[f"top1_head{k}"] = (correct / denominator).item()
    stats["loss"] = total.item()
    return total, stats


def medusa_eval(heads: MedusaHeads, rows: dict[str, torch.Tensor], decay: float, chunk: int = 8
                ) -> dict[str, float]:
    """``medusa_loss``'s statistics over all of ``rows``, ``chunk`` windows at a time (the heads' logits over every
    held-out window at once would not fit in memory with a real vocabulary)."""
    sums = torch.zeros(heads.num_heads, 3, dtype=torch.float64)
    for start in range(0, len(rows["input_ids"]), chunk):
        ids, hidden = rows["input_ids"][start:start + chunk], rows["hidden"][start:start + chunk]
        mask = rows["loss_mask"][start:start + chunk].float()
        logits = heads(hidden.to(heads.heads[0][-1].weight.dtype))
        for k in range(heads.num_heads):
            terms = head_terms(logits, ids, mask, k)
            if terms is not None:
                sums[k] += torch.stack([term.double().cpu() for term in terms])
    stats: dict[str, float] = {}
    total = 0.0
    for k in range(min(heads.num_heads, rows["input_ids"].shape[1] - 2)):
        loss_sum, correct, weight = sums[k].tolist()
        denominator = max(weight, 1.0)
        total += decay ** k * loss_sum / denominator
        stats[f"top1_head{k}"] = correct / denominator
    stats["loss"] = total
    return stats


def train_loop(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: build or read the features, train the heads, report them."""
    import datasets

    datasets.disable_progress_bars()
    worker = Worker.start(loop_config)
    config: MedusaTrainConfig = worker.config
    rank, device = worker.rank, worker.device

    target = load_model(replace(config.target, dtype="float32"), worker.zoo, device, "target").model
    features = worker_features(worker, target, load_tokenizer(config.target, worker.zoo), config.data,
                               Path(loop_config["features_dir"]),
                               [config.target.as_dict(), loop_config["target_key"]], config.eval_fraction)
    eval_rows = features.eval_rows
    heads = MedusaHeads.for_target(target, config.num_heads, config.num_layers).to(device)

    fitted = worker.fit(heads, lambda generator: features.draw(generator, config.batch_size),
                        lambda module, batch, generator: medusa_loss(module, batch, config.decay),
                        worker.generator(config.seed * 1000 + rank),
                        evaluate=lambda module: medusa_eval(module, features.to_device(eval_rows), config.decay),
                        progress="medusa heads", shown=("loss", "top1_head0"))
    module = fitted.module
    module.eval()
    module.measure_rank_accuracy(eval_rows["hidden"].to(device), eval_rows["input_ids"].to(device),
                                 eval_rows["loss_mask"].to(device))
    metrics = {"eval_before": fitted.before, "eval_after": fitted.after, "train_loss_first": fitted.loss_first(),
               "train_loss_last": fitted.loss_last(), "steps": config.steps, "train_windows": len(features.train),
               "parameters": module.own_parameters()}
    worker.finish(metrics, lambda directory: save_heads(module.float().eval(), directory,
                                                        config.target.id, {"metrics": metrics}))


def build_medusa(config: MedusaTrainConfig, zoo, out_dir: Path, target_key: str, name: str,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train heads for ``config`` and write them (published layout) to ``out_dir``; return their metrics."""
    return launch(train_loop, config, zoo, name, out_dir, log,
                  features_dir=str(features_dir(config.target, target_key, config.data)), target_key=target_key)


KIND = ArtifactKind("medusa", parse_medusa_config, build_medusa,
                    lambda request, target: load_heads(request.directory, target.device))
