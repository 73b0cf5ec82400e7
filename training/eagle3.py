"""Training an EAGLE-3 head with training-time test, through the trainer skeleton (Ray Train + DeepSpeed).

Data: the EAGLE feature dataset (``training.eagle_data``) with the target's fused features (the hidden states
entering layers 2, L // 2 and L - 3, the reference's choice, or the three ``feature_layers`` named) beside its last
hidden state, on the same sources EAGLE trains on. Named layers are written into the head's ``config.json``
(``eagle_aux_hidden_state_layer_ids``), so whoever loads the head feeds it the same features.

Training-time test (EAGLE-3, §3): the head is unrolled ``ttt_steps`` times (7) on its own outputs. Step 0 reads
``fc`` of the fused feature at position t with the embedding of token t + 1 and is trained towards the target's
distribution of token t + 2; step i reads the head's own h of step i - 1 at t with the embedding of token
t + 1 + i and is trained towards the target's distribution of token t + 2 + i, at RoPE position t + i. Step i at
t attends to step 0's entries at positions <= t and to its own chain's entries of steps 1..i at t (what a depth-i
draft node sees at inference: the cache of real positions and its ancestors). The loss is the soft
cross-entropy against the target's distribution over the draft vocabulary (renormalised there), step i weighted
``step_decay ** i`` (0.8); there is no feature regression. Gradients flow through the unrolled steps.

Where this differs from the reference code (SafeAILab/EAGLE, ``traineagle3``): each step's loss is averaged over
the positions that have a target (the reference divides by all positions, masked ones included), and every such
position counts (the reference also drops positions whose target argmax lies outside the draft vocabulary).
``vocab_subset: 0`` keeps the whole vocabulary as the draft vocabulary.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F

from harness.core.errors import ConfigError
from harness.core.models import ModelSpec, load_model, load_tokenizer
from strategies.eagle3_head import (Eagle3Head, eagle3_config, feature_layers, layer_ids_problem, load_eagle3_lm,
                                    save_eagle3)
from training.artifacts import ArtifactKind
from training.draft import frequent_tokens
from training.eagle_data import FeatureDataConfig, features_dir, worker_features
from training.launch import launch
from training.settings import check_ranges, mapping, parse_settings
from training.trainer import OptimSettings, Worker


@dataclass(frozen=True)
class Eagle3TrainConfig(OptimSettings):
    """Everything that determines a trained EAGLE-3 head (its hash names the artefact)."""

    target: ModelSpec = ModelSpec("zoo:target")
    data: FeatureDataConfig = field(default_factory=FeatureDataConfig)
    intermediate_size: int | None = None
    vocab_subset: int = 0  # the draft vocabulary: the N most frequent training tokens; 0 = the target's
    ttt_steps: int = 7
    step_decay: float = 0.8
    steps: int = 600
    batch_size: int = 16
    warmup_steps: int = 30
    grad_clip: float = 0.5
    eval_fraction: float = 0.05
    feature_layers: tuple[int, ...] = ()  # the fused layers (low, middle, high); () = 2, L // 2, L - 3

    KEYED_ONLY_WHEN_SET: ClassVar[frozenset[str]] = OptimSettings.KEYED_ONLY_WHEN_SET | {"feature_layers"}


def parse_layer_ids(raw: Any, where: str) -> tuple[int, ...]:
    """``feature_layers``: three increasing layer indices (checked against the target when it loads)."""
    problem = layer_ids_problem(raw)
    if problem:
        raise ConfigError(where, problem, "e.g. [2, 6, 11] for a 12-layer target, or leave it out for 2, L // 2, "
                                          "L - 3")
    return tuple(raw)


def fused_layers(config: Eagle3TrainConfig, layers: int, where: str) -> tuple[int, ...]:
    """The layers the head fuses on an ``layers``-layer target: ``config.feature_layers`` or the default."""
    if not config.feature_layers:
        return feature_layers(layers)
    problem = layer_ids_problem(list(config.feature_layers), layers)
    if problem:
        raise ConfigError(where, problem, f"name layers below {layers}")
    return config.feature_layers


def parse_eagle3_config(raw: dict[str, Any], where: str, base_dir: Path, zoo_names: tuple[str, ...]
                        ) -> Eagle3TrainConfig:
    """Validated EAGLE-3 training settings from a training-config mapping (``kind: eagle3``)."""
    config = parse_settings(Eagle3TrainConfig, raw, where, base_dir, zoo_names, allowed_note="kind", fields={
        "data": lambda value, path: FeatureDataConfig.from_dict(mapping(value, path), path),
        "feature_layers": parse_layer_ids,
    })
    check_ranges(config, where, {"vocab_subset": 0, "ttt_steps": 1})
    if not 0 < config.step_decay <= 1:
        raise ConfigError(f"{where}.step_decay", f"must be in (0, 1], got {config.step_decay}", "EAGLE-3 uses 0.8")
    if config.ttt_steps >= config.data.seq_len - 1:
        raise ConfigError(f"{where}.ttt_steps", f"must be below data.seq_len - 1 ({config.data.seq_len - 1})",
                          "unroll fewer steps or use longer windows")
    return config


def unrolled_attention(head: Eagle3Head, fused: torch.Tensor, positions: torch.Tensor, keys: list[torch.Tensor],
                       values: list[torch.Tensor]) -> torch.Tensor:
    """One training-time-test step's attention over ``[batch, t, 2h]`` inputs: each position sees step 0's
    entries up to itself and, for each later step so far (``keys``/``values`` of earlier steps, this step's
    appended), only the entry at its own position."""
    attn = head.midlayer.self_attn
    cos, sin = head.rotary(fused, positions)
    q, k, v = attn.project(fused, cos, sin)
    keys.append(k)
    values.append(v)
    groups = attn.heads // attn.kv_heads
    scale = 1.0 / math.sqrt(attn.head_dim)
    first_k, first_v = (torch.repeat_interleave(t, groups, dim=1) for t in (keys[0], values[0]))
    length = fused.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=fused.device).tril()
    scores = [(q @ first_k.transpose(-1, -2) * scale).masked_fill(~causal, float("-inf"))]
    later = [(torch.repeat_interleave(k_i, groups, dim=1), torch.repeat_interleave(v_i, groups, dim=1))
             for k_i, v_i in zip(keys[1:], values[1:])]
    scores += [((q * k_i).sum(-1, keepdim=True) * scale) for k_i, _ in later]
    weights = torch.softmax(torch.cat(scores, dim=-1).float(), dim=-1).to(q.dtype)
    out = weights[..., :length] @ first_v
    for index, (_, v_i) in enumerate(later):
        out = out + weights[..., length + index: length + index + 1] * v_i
    return attn.o_proj(out.transpose(1, 2).reshape(fused.shape[0], length, -1))


def eagle3_loss(head: Eagle3Head, target_head: torch.Tensor, batch: dict[str, torch.Tensor],
                config: Eagle3TrainConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """The training-time-test loss on a batch of (input_ids, hidden, fused, loss_mask); also each step's top-1
    agreement with the target (over the draft vocabulary)."""
    ids, hidden, fused, mask = batch["input_ids"], batch["hidden"], batch["fused"], batch["loss_mask"].float()
    dtype = head.fc.weight.dtype
    draft_ids = head.draft_ids
    with torch.no_grad():
        target_logits = F.linear(hidden.to(target_head.dtype), target_head).float()
        if draft_ids is not None:
            target_logits = target_logits[..., draft_ids]
        target_probs = torch.softmax(target_logits, dim=-1)  # position t: the target's distribution of token t + 1
    length = ids.shape[1] - 1
    feature = head.fuse(fused[:, :-1].to(dtype))
    keys: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    total = torch.zeros((), device=ids.device)
    stats: dict[str, float] = {}
    for step in range(config.ttt_steps):
        shift = 1 + step  # tokens t + 1 + step in, the target's distribution of token t + 2 + step out
        tokens = F.pad(ids[:, shift:], (0, shift - 1))[:, :length]
        wanted = F.pad(target_probs[:, shift:], (0, 0, 0, shift - 1))[:, :length]
        weight = F.pad(mask[:, shift:], (0, shift - 1))[:, :length]  # 0 where no target is left
        positions = torch.arange(length, device=ids.device)[None] + step
        embedded = head.embed_tokens(tokens).to(dtype)
        feature = head.midlayer(embedded, feature,
                                lambda x: unrolled_attention(head, x, positions, keys, values))
        log_probs = torch.log_softmax(head.draft_logits(feature).float(), dim=-1)
        denominator = weight.sum().clamp(min=1.0)
        loss = (-(wanted * log_probs).sum(-1) * weight).sum() / denominator
        total = total + config.step_decay ** step * loss
        agree = ((log_probs.argmax(-1) == wanted.argmax(-1)).float() * weight).sum() / denominator
        stats[f"top1_step{step}"] = agree.item()
    stats["loss"] = total.item()
    return total, stats


def train_loop(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: build or read the features, train the head, report it."""
    import datasets

    datasets.disable_progress_bars()
    worker = Worker.start(loop_config)
    config: Eagle3TrainConfig = worker.config
    rank, device = worker.rank, worker.device
    target = load_model(replace(config.target, dtype="float32"), worker.zoo, device, "target").model
    layers = fused_layers(config, int(target.config.num_hidden_layers), "feature_layers")
    features = worker_features(worker, target, load_tokenizer(config.target, worker.zoo), config.data,
                               features_dir(config.target, loop_config["target_key"], config.data, layers),
                               [config.target.as_dict(), loop_config["target_key"]], config.eval_fraction,
                               fused_layers=layers)
    eval_rows = features.eval_rows
    vocab = int(target.config.vocab_size)
    draft_ids = None
    if config.vocab_subset and config.vocab_subset < vocab:
        train_ids = features.train.select_columns(["input_ids"])[:]["input_ids"]
        draft_ids = frequent_tokens(torch.as_tensor(train_ids), vocab, config.vocab_subset,
                                    load_tokenizer(config.target, worker.zoo))
    head = Eagle3Head(eagle3_config(target.config, len(draft_ids or []), config.intermediate_size,
                                    config.feature_layers),
                      copy.deepcopy(target.get_input_embeddings()), draft_ids).to(device)
    target_head = target.get_output_embeddings().weight.detach()

    fitted = worker.fit(head, lambda generator: features.draw(generator, config.batch_size),
                        lambda module, batch, generator: eagle3_loss(module, target_head, batch, config),
                        worker.generator(config.seed * 1000 + rank),
                        evaluate=lambda module: eagle3_loss(module, target_head, features.to_device(eval_rows),
                                                             config)[1],
                        progress="eagle3 head", shown=("loss", "top1_step0"))
    module = fitted.module
    metrics = {"eval_before": fitted.before, "eval_after": fitted.after, "train_loss_first": fitted.loss_first(),
               "train_loss_last": fitted.loss_last(), "steps": config.steps, "train_windows": len(features.train),
               "parameters": module.own_parameters(), "feature_layers": list(layers)}
    worker.finish(metrics, lambda directory: save_eagle3(module.float().eval(), directory, {"metrics": metrics}))


def build_eagle3(config: Eagle3TrainConfig, zoo, out_dir: Path, target_key: str, name: str,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train an EAGLE-3 head for ``config`` and write it (reference layout) to ``out_dir``; return its metrics."""
    return launch(train_loop, config, zoo, name, out_dir, log, target_key=target_key)


KIND = ArtifactKind("eagle3", parse_eagle3_config, build_eagle3,
                    lambda request, target: load_eagle3_lm(request.directory, target))
