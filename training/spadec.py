"""SpaDec's trained parts as one artefact (kind ``spadec``): the D-LLM target, an EAGLE head trained on it, and
the acceptance predictor.

Built in order, each a cached artefact of its own:

1. the D-LLM target (``dllm``: a nested ``kind: dllm`` config, a path or a mapping), a Ray Train + DeepSpeed job;
2. the EAGLE head (``head``: a nested ``kind: eagle`` config) trained through the EAGLE pipeline on the D-LLM
   target's merged weights (its ``artifact:dllm/<key>`` model);
3. the predictor: EAGLE-2 decodes ``prompts`` with the D-LLM target and SpaDec's verifier with the predictor
   off, so every draft-tree node is verified; each node's hidden state entering layer K is logged with whether
   it ended on the accepted path; a linear + sigmoid predictor is fitted to those labels (binary cross-entropy,
   Adam) on all but ``eval_fraction`` of the prompts, and its AUC measured on the rest.

The artefact directory holds ``predictor.pt`` and ``spadec.json`` (the two nested keys, K, the metrics);
``load_spadec`` returns the three parts, loaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from harness.core.corpus import DOMAINS, heldout_prompts
from harness.core.dllm import SkippingLM
from harness.core.errors import ConfigError
from harness.core.metrics import roc_auc
from harness.core.models import ModelSpec, load_tokenizer, pick_device
from strategies.eagle_head import load_head_lm
from strategies.engine import decode
from strategies.methods.eagle import Eagle2Params, TreeHeadProposer
from strategies.methods.spadec import PredictorLog, SpaDecVerifier, default_split
from strategies.sampling import Sampling
from strategies.spadec_selection import AcceptancePredictor
from training.artifacts import ArtifactKind, ArtifactRequest, build_artifact, parse_train_config
from training.dllm import DLLMTrainConfig, load_dllm
from training.eagle import EagleTrainConfig
from training.launch import LaunchSettings
from training.settings import TrainSettings, check_ranges, parse_settings, string_list

PREDICTOR_FILE = "predictor.pt"
BUNDLE_FILE = "spadec.json"


@dataclass(frozen=True)
class SpaDecTrainConfig(TrainSettings):
    """Everything that determines SpaDec's trained parts (its hash names the artefact)."""

    target: ModelSpec = ModelSpec("zoo:target")
    dllm: DLLMTrainConfig = field(default_factory=DLLMTrainConfig)
    head: EagleTrainConfig = field(default_factory=EagleTrainConfig)
    split: int = 0  # K; 0 = 6 of 32 layers scaled by depth
    prompts: tuple[str, ...] = ("zoo:code", "zoo:prose", "zoo:legal", "zoo:math")
    count: int = 8  # prompts per source for the predictor's labels
    max_new_tokens: int = 64
    total_tokens: int = 16
    depth: int = 5
    top_k: int = 3
    steps: int = 300
    lr: float = 0.01
    eval_fraction: float = 0.25
    seed: int = 0
    launch: LaunchSettings = field(default_factory=LaunchSettings)


def parse_spadec_config(raw: dict[str, Any], where: str, base_dir: Path, zoo_names: tuple[str, ...]) -> SpaDecTrainConfig:
    """Validated SpaDec settings (``kind: spadec``); ``dllm`` and ``head`` are training configs (paths or mappings)
    bound to this config's target."""
    def nested(kind: str) -> Callable[[Any, str], Any]:
        return lambda value, path: parse_train_config(value, path, base_dir, zoo_names, expected_kind=kind)[1]

    config = parse_settings(SpaDecTrainConfig, raw, where, base_dir, zoo_names, allowed_note="kind", fields={
        "dllm": nested("dllm"), "head": nested("eagle"), "prompts": string_list})
    for index, source in enumerate(config.prompts):
        if not source.startswith("zoo:") or source.removeprefix("zoo:") not in DOMAINS:
            raise ConfigError(f"{where}.prompts[{index}]", f"expected a zoo prompt set, got {source!r}",
                              f"choose from {', '.join('zoo:' + domain for domain in DOMAINS)}")
    check_ranges(config, where, {"count": 2, "max_new_tokens": 1, "total_tokens": 2, "depth": 1, "top_k": 1,
                                 "steps": 1, "split": 0})
    return replace(config, dllm=replace(config.dllm, target=config.target), head=replace(config.head, target=config.target))


def nested_requests(config: SpaDecTrainConfig, zoo: Any) -> tuple[Any, Any]:
    """The D-LLM target's artefact request, and the EAGLE head's, bound to the D-LLM target's merged weights."""
    dllm = ArtifactRequest("dllm", config.dllm, zoo)
    head = ArtifactRequest("eagle", replace(config.head, target=ModelSpec(dllm.model_id())), zoo)
    return dllm, head


def collect_labels(target: SkippingLM, head: Any, prompts: list[list[int]], config: SpaDecTrainConfig,
                   split: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per prompt: the hidden states entering layer ``split`` of every verified tree node, and whether each node
    ended on the accepted path (EAGLE-2 with SpaDec's verifier, predictor off)."""
    params = Eagle2Params(head="head", total_tokens=config.total_tokens, depth=config.depth, top_k=config.top_k)
    features, labels = [], []
    for prompt in prompts:
        log = PredictorLog(keep_features=True)
        decode(target, TreeHeadProposer(head, params), prompt, config.max_new_tokens, Sampling(),
               verifier=SpaDecVerifier(split, log=log))
        features.append(torch.cat(log.features) if log.features else torch.zeros(0, target.model.config.hidden_size))
        labels.append(torch.tensor(log.accepted, dtype=torch.float32))
    return features, labels


def fit_predictor(features: list[torch.Tensor], labels: list[torch.Tensor], hidden: int,
                  config: SpaDecTrainConfig) -> tuple[AcceptancePredictor, dict[str, Any]]:
    """Train the predictor on the first prompts and measure it (loss, AUC) on the last ``eval_fraction``."""
    held = max(1, round(len(features) * config.eval_fraction))
    train_x, train_y = torch.cat(features[:-held]).float(), torch.cat(labels[:-held])
    eval_x, eval_y = torch.cat(features[-held:]).float(), torch.cat(labels[-held:])
    torch.manual_seed(config.seed)
    predictor = AcceptancePredictor(hidden)
    optimizer = torch.optim.Adam(predictor.parameters(), lr=config.lr)
    with torch.no_grad():
        before = float(predictor.loss(train_x, train_y))
    for _ in range(config.steps):
        optimizer.zero_grad()
        loss = predictor.loss(train_x, train_y)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = float(predictor.loss(train_x, train_y))
        eval_loss = float(predictor.loss(eval_x, eval_y))
        probabilities = predictor(eval_x).tolist()
    metrics = {"train_nodes": len(train_y), "eval_nodes": len(eval_y), "accepted_share": float(train_y.mean()),
               "loss_before": before, "loss_after": after, "eval_loss": eval_loss,
               "eval_auc": roc_auc(eval_y.int().tolist(), probabilities)}
    return predictor, metrics


def build_spadec(config: SpaDecTrainConfig, zoo, out_dir: Path, target_key: str, name: str,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Build the D-LLM target and the head (cached artefacts of their own), then fit the predictor into
    ``out_dir``; return the metrics."""
    dllm_request, head_request = nested_requests(config, zoo)
    build_artifact(dllm_request, log=log)
    build_artifact(head_request, log=log)
    target = load_dllm(dllm_request.directory, pick_device("auto"), torch.float32)
    head = load_head_lm(head_request.directory, target)
    split = config.split or default_split(target.layer_count)
    tokenizer = load_tokenizer(config.target, zoo)
    texts = [text for source in config.prompts
             for text in heldout_prompts(source.removeprefix("zoo:"), config.count, config=zoo.corpus)]
    prompts = [tokenizer(text)["input_ids"] for text in texts]
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(config.seed)).tolist()
    features, labels = collect_labels(target, head, [prompts[i] for i in order], config, split)
    predictor, metrics = fit_predictor(features, labels, target.model.config.hidden_size, config)
    metrics.update({"split": split, "prompts": len(prompts), "dllm": dllm_request.key(), "head": head_request.key()})
    log(f"spadec predictor: AUC {metrics['eval_auc']} on {metrics['eval_nodes']} held-out nodes, K {split}")
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(predictor.state_dict(), out_dir / PREDICTOR_FILE)
    (out_dir / BUNDLE_FILE).write_text(json.dumps({"hidden_size": target.model.config.hidden_size, **metrics},
                                                  indent=2))
    return metrics


@dataclass
class SpaDecParts:
    """SpaDec's trained parts, loaded: the D-LLM target, the EAGLE head on it, the predictor and K."""

    target: SkippingLM
    head: Any
    predictor: AcceptancePredictor
    split: int


def load_spadec(request: Any, target: Any) -> SpaDecParts:
    """The artefact of ``request`` (kind ``spadec``) loaded on ``target``'s device and dtype."""
    dllm_request, head_request = nested_requests(request.config, request.zoo)
    settings = json.loads((request.directory / BUNDLE_FILE).read_text())
    skipping = load_dllm(dllm_request.directory, target.device, target.dtype)
    head = load_head_lm(head_request.directory, skipping)
    predictor = AcceptancePredictor(settings["hidden_size"])
    predictor.load_state_dict(torch.load(request.directory / PREDICTOR_FILE, map_location="cpu", weights_only=True))
    return SpaDecParts(skipping, head, predictor.to(skipping.device, skipping.dtype).eval(), settings["split"])


KIND = ArtifactKind("spadec", parse_spadec_config, build_spadec, load_spadec)
