"""The embedded zoo: a tokenizer, a Llama target and distilled Llama drafts, trained offline.

No hub is reachable at run time, so specsweep builds its own small model family
on the corpus of :mod:`harness.core.corpus`. Each build is keyed by a hash of its
:class:`ZooConfig` and saved with ``save_pretrained`` under
``$SPECSWEEP_HOME/zoo/<hash>/<model>``, where ``AutoModelForCausalLM`` and
``AutoTokenizer`` load it like any Hugging Face checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Iterable
from typing import Any, Callable

import torch
import torch.nn.functional as F

from harness.core.checksums import FILES_KEY, CorruptCache, file_digests
from harness.core.corpus import DOMAINS, Document, build_corpus
from harness.core.zoo_spec import (ZOO_CONTEXT, ZOO_MANIFEST, Schedule, ZooConfig, ZooModelConfig, is_built,
                                   model_path, needed_models, verify_zoo, zoo_dir)

BOS, EOS, PAD = "<s>", "</s>", "<pad>"




# ---------------------------------------------------------------- tokenizer


def train_tokenizer(texts: list[str], vocab_size: int):
    """Train a byte-level BPE tokenizer and wrap it as a ``PreTrainedTokenizerFast`` that adds BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, tokenizer.token_to_id(BOS))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=1 << 20
    )


# ---------------------------------------------------------------- data


class WindowSampler:
    """Random fixed-length token windows, balanced across domains."""

    def __init__(self, token_streams: dict[str, torch.Tensor], seq_len: int, seed: int):
        self.streams = [stream for stream in token_streams.values() if len(stream) > seq_len + 1]
        self.seq_len = seq_len
        self.generator = torch.Generator().manual_seed(seed)

    def batch(self, batch_size: int) -> torch.Tensor:
        rows = []
        for index in range(batch_size):
            stream = self.streams[index % len(self.streams)]
            start = int(torch.randint(0, len(stream) - self.seq_len - 1, (1,), generator=self.generator))
            rows.append(stream[start : start + self.seq_len + 1])
        return torch.stack(rows)

    def skip(self, schedule: Schedule) -> None:
        """Draw and drop the batches ``schedule`` trains on, as a model trained on them would have drawn them."""
        for _ in range(schedule.steps):
            self.batch(schedule.batch_size)


def encode_documents(tokenizer, docs: list[Document]) -> torch.Tensor:
    """Concatenate ``<s> doc </s>`` token ids of ``docs`` into one stream."""
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer(doc.text)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


# ---------------------------------------------------------------- models


def make_model(shape: ZooModelConfig, tokenizer, config: ZooConfig):
    """A randomly initialised ``LlamaForCausalLM`` of ``shape`` using the tokenizer's special ids."""
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        max_position_embeddings=ZOO_CONTEXT,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(config.seed + shape.layers)
    return LlamaForCausalLM(llama)


def init_from_teacher(student, teacher) -> None:
    """Copy embeddings, final norm, LM head and evenly spaced decoder layers from ``teacher``."""
    student.model.embed_tokens.load_state_dict(teacher.model.embed_tokens.state_dict())
    student.model.norm.load_state_dict(teacher.model.norm.state_dict())
    student.lm_head.load_state_dict(teacher.lm_head.state_dict())
    n_student, n_teacher = len(student.model.layers), len(teacher.model.layers)
    picks = [round(i * (n_teacher - 1) / max(1, n_student - 1)) for i in range(n_student)] if n_student > 1 else [0]
    for student_layer, teacher_index in zip(student.model.layers, picks):
        student_layer.load_state_dict(teacher.model.layers[teacher_index].state_dict())


def _lr_at(step: int, schedule: Schedule) -> float:
    if step < schedule.warmup_steps:
        return schedule.lr * (step + 1) / schedule.warmup_steps
    progress = (step - schedule.warmup_steps) / max(1, schedule.steps - schedule.warmup_steps)
    return schedule.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(
    model,
    sampler: WindowSampler,
    schedule: Schedule,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    log: Callable[[str], None],
    label: str,
) -> float:
    """Run ``schedule`` on ``model`` with ``loss_fn(logits, batch)``; return the final smoothed loss."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=schedule.lr, weight_decay=0.1, betas=(0.9, 0.95))
    model.train()
    smoothed = float("nan")
    started = time.perf_counter()
    for step in range(schedule.steps):
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, schedule)
        batch = sampler.batch(schedule.batch_size)
        logits = model(input_ids=batch[:, :-1]).logits
        loss = loss_fn(logits, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        smoothed = loss.item() if math.isnan(smoothed) else 0.95 * smoothed + 0.05 * loss.item()
        if (step + 1) % 100 == 0 or step + 1 == schedule.steps:
            log(f"  {label} step {step + 1}/{schedule.steps} loss {smoothed:.3f} ({time.perf_counter() - started:.0f} s)")
    model.eval()
    return smoothed


def next_token_loss(logits: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``logits`` against the batch shifted by one."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))


def distillation_loss(teacher) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Forward KL(teacher || student) per token, the teacher scored on the same batch."""
    def loss(student_logits: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher_logprobs = F.log_softmax(teacher(input_ids=batch[:, :-1]).logits, dim=-1)
        student_logprobs = F.log_softmax(student_logits, dim=-1)
        return F.kl_div(student_logprobs.flatten(0, 1), teacher_logprobs.flatten(0, 1), log_target=True, reduction="batchmean")

    return loss


@torch.no_grad()
def evaluate(models: dict[str, Any], windows: torch.Tensor, target_name: str) -> dict[str, dict[str, float]]:
    """Held-out perplexity of each model and each model's greedy agreement with the target."""
    inputs, labels = windows[:, :-1], windows[:, 1:]
    target_argmax = models[target_name](input_ids=inputs).logits.argmax(-1)
    metrics = {}
    for name, model in models.items():
        logits = model(input_ids=inputs).logits
        nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1))
        metrics[name] = {
            "heldout_perplexity": round(math.exp(nll.item()), 2),
            "greedy_agreement": round((logits.argmax(-1) == target_argmax).float().mean().item(), 4),
            "parameters": sum(p.numel() for p in model.parameters()),
        }
    return metrics


# ---------------------------------------------------------------- build


def reusable_base(config: ZooConfig) -> ZooConfig | None:
    """A built zoo that is ``config`` less some trailing domain-limited drafts, or None.

    Such drafts train from seeds of their own (see ``build_zoo``), so training only
    them on top of that build gives the same weights as building ``config`` afresh.
    """
    for keep in range(len(config.drafts) - 1, -1, -1):
        if not config.drafts[keep].domains:
            return None
        base = dataclasses.replace(config, drafts=config.drafts[:keep])
        if is_built(base):
            return base
    return None


def build_zoo(config: ZooConfig, log: Callable[[str], None] = print, force: bool = False,
              only: Iterable[str] | None = None) -> dict[str, Any]:
    """Build (or reuse) the zoo for ``config``, or only what the models ``only`` need (``needed_models``): a sweep
    that names no domain-limited draft does not train one. Models missing from an earlier build are trained into
    it. Returns the manifest with per-model metrics. A built zoo whose files differ from their recorded checksums
    is rebuilt."""
    out = zoo_dir(config)
    manifest_path = out / ZOO_MANIFEST
    only = None if only is None else tuple(only)  # read twice below
    wanted = needed_models(config, only)
    existing: dict[str, Any] = {}
    if manifest_path.exists() and not force:
        try:
            verify_zoo(config)
            existing = json.loads(manifest_path.read_text())
        except CorruptCache as error:
            log(f"{error}: rebuilding it")
            manifest_path.unlink()
            force = True
        if existing and is_built(config, only):
            return existing
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    base = None if force or existing else reusable_base(config)
    built = base or (config if existing else None)  # a build whose models this one starts from
    log(f"building zoo {config.key()} in {out}" + (f" on top of {base.key()}" if base else "")
        + (f" (adding {', '.join(name for name in wanted if name not in existing['models'])})" if existing else ""))
    corpus = build_corpus(config.corpus)
    if built is None:
        train_texts = [doc.text for domain in DOMAINS for doc in corpus[domain][0]]
        tokenizer = train_tokenizer(train_texts, config.vocab_size)
    else:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(model_path(built, built.target.name))
    log(f"  tokenizer: {len(tokenizer)} tokens ({time.perf_counter() - started:.0f} s)")
    train_streams = {domain: encode_documents(tokenizer, corpus[domain][0]) for domain in DOMAINS}
    heldout_streams = {domain: encode_documents(tokenizer, corpus[domain][1]) for domain in DOMAINS}
    sampler = WindowSampler(train_streams, config.seq_len, config.seed)
    eval_windows = WindowSampler(heldout_streams, config.seq_len, config.seed + 1).batch(config.eval_windows)

    if built is None:
        target = make_model(config.target, tokenizer, config)
        train(target, sampler, config.pretrain, next_token_loss, log, config.target.name)
        models = {config.target.name: target}
    else:
        names = existing["models"] if existing else built.model_names
        models = {name: LlamaForCausalLM.from_pretrained(model_path(built, name), dtype=torch.float32)
                  for name in names}
        target = models[config.target.name]
        sampler.skip(config.pretrain)  # the target's batches: the drafts draw theirs after them
    saved = set(existing.get("models", ()))
    for parameter in target.parameters():
        parameter.requires_grad_(False)
    for index, shape in enumerate(config.drafts):
        if shape.name in models and not shape.domains:
            sampler.skip(config.distill)  # built earlier: the drafts after it draw the batches that follow its own
        if shape.name in models or shape.name not in wanted:
            continue
        if shape.domains:
            # A draft limited to some domains has its own seeds and sampler: the other drafts train exactly as they
            # would without it, and it comes out the same whether built with them, on top of them or later.
            torch.manual_seed(config.seed + 100 + index)
            source = WindowSampler({domain: train_streams[domain] for domain in shape.domains}, config.seq_len,
                                   config.seed + 100 + index)
        else:
            source = sampler
        draft = make_model(shape, tokenizer, config)
        if shape.init_from_target and shape.hidden == config.target.hidden:
            init_from_teacher(draft, target)
        train(draft, source, config.distill, distillation_loss(target), log, shape.name)
        models[shape.name] = draft

    metrics = evaluate(models, eval_windows, config.target.name)
    for name, model in models.items():
        if name in saved:
            continue
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(out / name, safe_serialization=True)
        tokenizer.save_pretrained(out / name)
    manifest = {
        "key": config.key(),
        "config": dataclasses.asdict(config),
        "models": {name: metrics[name] for name in config.model_names if name in metrics},
        "train_tokens": {domain: len(stream) for domain, stream in train_streams.items()},
        "build_seconds": round(existing.get("build_seconds", 0.0) + time.perf_counter() - started, 1),
        FILES_KEY: file_digests(out, skip={ZOO_MANIFEST}),
    }
    manifest_path.write_text(json.dumps(manifest, indent=2))
    return manifest


def format_manifest(manifest: dict[str, Any]) -> str:
    """A short human-readable table of the zoo's models and their metrics."""
    lines = [f"zoo {manifest['key']} (built in {manifest['build_seconds']} s)"]
    lines.append(f"{'model':<14} {'params':>10} {'held-out ppl':>13} {'greedy agreement':>17}")
    for name, metrics in manifest["models"].items():
        lines.append(
            f"{name:<14} {metrics['parameters'] / 1e6:>9.2f}M {metrics['heldout_perplexity']:>13.1f} "
            f"{metrics['greedy_agreement'] * 100:>16.1f}%"
        )
    return "\n".join(lines)
