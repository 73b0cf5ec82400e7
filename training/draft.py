"""Distilled drafts for any target: the target's own first layers, trained to imitate the whole target.

A draft of ``layers`` decoder layers starts as the target's early exit (its
embedding, first ``layers`` layers, final norm and LM head, as in LayerSkip and
Draft & Verify), so it shares the target's tokenizer and is useful before any
training. Distillation then trains the kept layers and the final norm to match
the target's next-token distribution (forward KL, teacher and student at
temperature 1) on text the machine has (``zoo:<domain>``, ``hf:<dataset>`` or a
file) or on the target's own chat answers to it (``answers:<source>``), through
the Ray Train + DeepSpeed launcher. Embedding and LM head stay frozen (the
draft's own copies of the target's).

A real vocabulary makes the LM head the draft's largest cost (49,152 x 576 is
about 21 % of SmolLM2-135M). With ``vocab_subset: N`` the draft's head keeps
only the N tokens most frequent in the training text (FR-Spec, Zhao et al.
2025): the loss is the KL between the target's and the draft's distributions
renormalised over those N tokens, and at decode time the draft proposes only
from them. The target still verifies over the full vocabulary, so decoding
stays lossless. The result is a plain Hugging Face directory (``model/``, plus
``vocab_subset.json`` when cut) that any sweep can name as a draft.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from harness.core.errors import ConfigError
from harness.core.models import VOCAB_SUBSET_FILE, ModelSpec, keep_first_layers, load_model, load_tokenizer
from training.artifacts import ArtifactKind
from training.eagle_data import FeatureDataConfig
from training.launch import launch
from training.settings import check_ranges, mapping, parse_settings
from training.trainer import OptimSettings, Worker, mean_stats
from training.text import token_windows

MODEL_DIR = "model"


@dataclass(frozen=True)
class DraftTrainConfig(OptimSettings):
    """Everything that determines a distilled draft (its hash names the artefact)."""

    target: ModelSpec = ModelSpec("zoo:target")
    layers: int = 1
    vocab_subset: int = 0  # keep the N most frequent tokens in the draft's head (FR-Spec); 0 = the full vocabulary
    data: FeatureDataConfig = field(default_factory=FeatureDataConfig)
    lr: float = 5e-4
    warmup_steps: int = 20
    eval_fraction: float = 0.05


def parse_draft_config(raw: dict[str, Any], where: str, base_dir: Path, zoo_names: tuple[str, ...]) -> DraftTrainConfig:
    """Validated draft-distillation settings from a training-config mapping (``kind: draft``)."""
    config = parse_settings(DraftTrainConfig, raw, where, base_dir, zoo_names, allowed_note="kind", fields={
        "data": lambda value, path: FeatureDataConfig.from_dict(mapping(value, path), path),
    })
    check_ranges(config, where, {"layers": 1, "vocab_subset": 0})
    if config.target.layers is not None:
        raise ConfigError(f"{where}.target.layers", "the target must be whole", "set the draft's depth with layers")
    return config


def frequent_tokens(windows: torch.Tensor, vocab_size: int, count: int, tokenizer: Any) -> list[int]:
    """The ``count`` most frequent token ids of ``windows`` (ties to the smaller id), plus ``tokenizer``'s EOS/BOS/pad."""
    counts = torch.bincount(windows.flatten(), minlength=vocab_size)[:vocab_size]
    order = torch.sort(-counts, stable=True).indices[:count].tolist()
    specials = (tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id)
    return sorted(set(order) | {token for token in specials if token is not None and 0 <= token < vocab_size})


def early_exit_draft(target: torch.nn.Module, layers: int) -> torch.nn.Module:
    """A copy of ``target`` cut to its first ``layers`` layers, with its embedding and LM head frozen.

    The draft holds its own copies of the frozen modules rather than the target's: DeepSpeed casts the module
    it trains (bf16 on GPU) in place, which would otherwise cast the teacher's embedding and head too.
    """
    body = target.get_decoder()
    kept = body.layers
    body.layers = kept[:layers]  # copy only what the draft keeps
    try:
        student = copy.deepcopy(target)
    finally:
        body.layers = kept
    keep_first_layers(student, layers)
    for parameter in student.parameters():
        parameter.requires_grad_(True)
    for module in (student.get_input_embeddings(), student.get_output_embeddings()):
        for parameter in module.parameters():
            parameter.requires_grad_(False)
    return student


def subset_logits(model: torch.nn.Module, ids: torch.Tensor, head_rows: torch.Tensor) -> torch.Tensor:
    """``model``'s logits for ``ids`` over the LM-head rows ``head_rows`` only (its last hidden states x those rows)."""
    hidden = model.get_decoder()(input_ids=ids).last_hidden_state
    return F.linear(hidden, head_rows.to(hidden.dtype)).float()


def distill_loss(student, target, ids: torch.Tensor, head_rows: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Forward KL(target || draft) over the head rows (the subset, renormalised), and the top-1 agreement."""
    with torch.no_grad():
        teacher = subset_logits(target, ids, head_rows)
        teacher_log = torch.log_softmax(teacher, dim=-1)
    student_log = torch.log_softmax(subset_logits(student, ids, head_rows), dim=-1)
    kl = (teacher_log.exp() * (teacher_log - student_log)).sum(-1).mean()
    agree = (student_log.argmax(-1) == teacher.argmax(-1)).float().mean()
    return kl, {"kl": kl.item(), "top1": agree.item()}


def train_loop(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: tokenise the text, distil the draft, report its directory."""
    worker = Worker.start(loop_config)
    config: DraftTrainConfig = worker.config
    device = worker.device

    target = load_model(replace(config.target, dtype="float32"), worker.zoo, device, "target").model.eval()
    for parameter in target.parameters():
        parameter.requires_grad_(False)
    tokenizer = load_tokenizer(config.target, worker.zoo)
    windows = token_windows(tokenizer, config.data, worker.zoo.corpus, target,
                            [config.target.as_dict(), loop_config["target_key"]])
    held_out = max(1, int(len(windows) * config.eval_fraction))
    train_rows, eval_rows = windows[held_out:], windows[:held_out].to(device)
    vocab = target.get_output_embeddings().weight.shape[0]
    subset = None
    if config.vocab_subset and config.vocab_subset < vocab:
        subset = frequent_tokens(train_rows, vocab, config.vocab_subset, tokenizer)
    head_weight = target.get_output_embeddings().weight
    head_rows = head_weight if subset is None else head_weight[torch.tensor(subset, device=head_weight.device)]

    def evaluate(module: torch.nn.Module) -> dict[str, float]:
        stats = [distill_loss(module, target, eval_rows[i:i + config.batch_size], head_rows)[1]
                 for i in range(0, len(eval_rows), config.batch_size)]
        return mean_stats(stats)

    def draw(generator: torch.Generator) -> torch.Tensor:
        return train_rows[torch.randint(0, len(train_rows), (config.batch_size,), generator=generator)].to(device)

    fitted = worker.fit(early_exit_draft(target, config.layers).to(device), draw,
                        lambda module, batch, _: distill_loss(module, target, batch, head_rows),
                        worker.generator(config.seed * 1000 + worker.rank), evaluate=evaluate,
                        progress="draft", shown=("kl", "top1"))
    module = fitted.module
    metrics = {"eval_before": fitted.before, "eval_after": fitted.after, "steps": config.steps, "layers": config.layers,
               "train_windows": len(train_rows), "train_tokens": config.steps * config.batch_size * config.data.seq_len,
               "vocab_subset": len(subset) if subset else vocab,
               "parameters": sum(p.numel() for p in module.parameters()), "world_size": worker.world}

    def write(directory: Path) -> None:
        out = directory / MODEL_DIR
        module.eval()
        module.save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))
        if subset is not None:
            (out / VOCAB_SUBSET_FILE).write_text(json.dumps(subset))
        (directory / "draft.json").write_text(json.dumps({"metrics": metrics}, indent=2))

    worker.finish(metrics, write)


def build_draft(config: DraftTrainConfig, zoo, out_dir: Path, target_key: str, name: str,
                log: Callable[[str], None] = print) -> dict[str, Any]:
    """Distil a draft for ``config`` into ``out_dir`` (a Hugging Face directory under ``model/``); return its metrics."""
    return launch(train_loop, config, zoo, name, out_dir, log, target_key=target_key)


KIND = ArtifactKind("draft", parse_draft_config, build_draft, lambda request, target: request.directory / MODEL_DIR)
