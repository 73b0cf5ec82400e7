"""Adaptive drafts (Online Speculative Decoding, Liu et al. 2024): retrain the draft on the cases it gets wrong.

Rounds over a prompt stream of one domain. In each round, speculative
decoding with the current draft (the base draft plus the latest LoRA) runs on
held-out prompts of the domain (alpha, tau and paired wall speedup against
the autoregressive baseline) and then on the round's stream prompts, whose
*failure cases* (acceptance below ``threshold``) are logged with the
positions where the target corrected the draft. Every ``retrain_every``
failures a DeepSpeed job (the shared launcher) LoRA-trains the draft on the
new cases plus a replay buffer of earlier ones, with the loss on the corrected
positions only: forward KL(p || q), reverse KL(q || p), or their mix
``w * forward + (1 - w) * reverse`` as in OSD. The next round drafts with the
new adapter. Results go to ``rounds.csv``, ``failures.jsonl``, ``report.md``
and ``alpha.png`` in the run directory.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch

from harness.core.corpus import DOMAINS, build_corpus, heldout_prompts
from harness.core.errors import ConfigError
from harness.core.lm import CausalLM
from harness.core.metrics import summarize
from harness.core.models import ModelSpec, load_model, load_tokenizer, pick_device
from harness.core.paths import content_hash, specsweep_home
from harness.core.records import PromptRecord, SideRecord, paired_turn
from harness.core.tables import fmt
from harness.core.yaml_file import read_yaml
from strategies import ModelSet, Sampling, build
from strategies.timing import timed_generate
from training.launch import launch
from training.settings import LoraSettings, parse_settings
from training.trainer import LEGACY_ADAMW, OptimSettings, Worker
from training.zoo import build_zoo, is_built

LOSSES = ("forward_kl", "reverse_kl", "mix")


@dataclass(frozen=True)
class AdaptiveConfig(OptimSettings):
    """The stream, the failure rule, the retraining job and the evaluation (see ``configs/adaptive.yaml``)."""

    name: str = "adaptive"
    target: ModelSpec = ModelSpec("zoo:target")
    draft: ModelSpec = ModelSpec("zoo:draft-1l")
    domain: str = "legal"
    rounds: int = 3
    prompts_per_round: int = 16
    heldout_prompts: int = 8
    prompt_chars: int = 320
    gamma: int = 4
    max_new_tokens: int = 48
    threshold: float = 0.6
    retrain_every: int = 8
    replay: int = 64
    loss: str = "mix"
    mix_weight: float = 0.5
    lora: LoraSettings = field(default_factory=lambda: LoraSettings(r=8, alpha=16, dropout=0.0))
    steps: int = 80
    lr: float = 3e-3
    schedule: str = "warmup_constant"
    weight_decay: float = 0.01
    adam_beta2: float = 0.999

    KEYED_ONLY_WHEN_SET: ClassVar[frozenset[str]] = LEGACY_ADAMW


def load_adaptive_config(path: Path, zoo_names: tuple[str, ...]) -> AdaptiveConfig:
    """Read and validate an adaptive-drafts YAML file."""
    raw = read_yaml(path, "config", "adaptive YAML file, e.g. configs/adaptive.yaml")
    if not isinstance(raw, dict):
        raise ConfigError("config", "expected a mapping", "see configs/adaptive.yaml")
    as_text = {name: (lambda value, where: str(value)) for name in ("name", "domain", "loss")}
    config = parse_settings(AdaptiveConfig, raw, "", path.parent, zoo_names, fields=as_text)
    if config.domain not in DOMAINS:
        raise ConfigError("domain", f"unknown zoo domain {config.domain!r}", f"choose one of {', '.join(DOMAINS)}")
    if config.loss not in LOSSES:
        raise ConfigError("loss", f"unknown loss {config.loss!r}", f"choose one of {', '.join(LOSSES)}")
    for name in ("rounds", "prompts_per_round", "heldout_prompts", "gamma", "retrain_every", "steps"):
        if getattr(config, name) < 1:
            raise ConfigError(name, f"must be >= 1, got {getattr(config, name)}")
    return config


# ---------------------------------------------------------------------------- failure cases


def corrected_positions(prompt_length: int, steps: list[Any]) -> list[int]:
    """Absolute positions of the tokens the target put in place of a rejected draft token."""
    positions, cursor = [], prompt_length
    for step in steps:
        cursor += step.accepted + 1
        if step.accepted < step.drafted:
            positions.append(cursor - 1)
    return positions


def stream_prompts(domain: str, count: int, chars: int, seed: int, zoo_corpus) -> list[str]:
    """``count`` prompts cut from the domain's training documents (the stream; disjoint from held-out text)."""

    documents = [doc.text for doc in build_corpus(zoo_corpus)[domain][0]]
    rng = random.Random(f"stream/{domain}/{seed}")
    prompts = []
    for _ in range(count):
        document = documents[rng.randrange(len(documents))]
        start = rng.randrange(max(1, len(document) - chars))
        prompts.append(document[start:start + chars])
    return prompts


# ---------------------------------------------------------------------------- retraining


def osd_loss(draft_logits: torch.Tensor, target_logits: torch.Tensor, loss: str, weight: float) -> torch.Tensor:
    """Forward KL(p || q), reverse KL(q || p) or their mix, per row, averaged."""
    log_q = torch.log_softmax(draft_logits.float(), dim=-1)
    log_p = torch.log_softmax(target_logits.float(), dim=-1)
    forward = (log_p.exp() * (log_p - log_q)).sum(-1)
    reverse = (log_q.exp() * (log_q - log_p)).sum(-1)
    if loss == "forward_kl":
        return forward.mean()
    if loss == "reverse_kl":
        return reverse.mean()
    return (weight * forward + (1 - weight) * reverse).mean()


def train_loop(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: LoRA-train the draft on failure cases, loss on the corrected positions."""
    from peft import get_peft_model

    worker = Worker.start(loop_config)
    config: AdaptiveConfig = worker.config
    cases, device = loop_config["cases"], worker.device
    target = load_model(config.target, worker.zoo, device, "target").model.eval()
    model = get_peft_model(load_model(config.draft, worker.zoo, device, "draft").model, config.lora.peft_config())

    def case_loss(module: torch.nn.Module, case: dict[str, Any]) -> torch.Tensor:
        ids = torch.tensor([case["tokens"]], device=device)
        rows = torch.tensor(case["corrected"], device=device) - 1  # logits that predict each corrected token
        with torch.no_grad():
            target_logits = target(input_ids=ids).logits[0, rows]
        return osd_loss(module(input_ids=ids).logits[0, rows], target_logits, config.loss, config.mix_weight)

    def draw(generator: torch.Generator) -> list[int]:
        return torch.randint(0, len(cases), (min(config.batch_size, len(cases)),), generator=generator).tolist()

    fitted = worker.fit(model, draw,
                        lambda module, batch, _: (torch.stack([case_loss(module, cases[i]) for i in batch]).mean(), {}),
                        worker.generator(config.seed))
    metrics = {"cases": len(cases), "loss_first": fitted.loss_first(5), "loss_last": fitted.loss_last(5)}
    worker.finish(metrics, lambda directory: fitted.module.save_pretrained(str(directory)))


# ---------------------------------------------------------------------------- the rounds


def run_adaptive(config: AdaptiveConfig, zoo, run_dir: Path, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run the rounds; write rounds.csv, failures.jsonl, report.md and alpha.png to ``run_dir``; return the rows."""
    from peft import PeftModel  # lazy: peft, only for the retrained drafts

    names = [spec.zoo_name for spec in (config.target, config.draft) if spec.zoo_name]
    if not is_built(zoo, names):
        build_zoo(zoo, log=log, only=names)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = pick_device("auto")
    target = load_model(config.target, zoo, device, "target")
    base_draft = load_model(config.draft, zoo, device, "draft")
    tokenizer = load_tokenizer(config.target, zoo)
    heldout = [tokenizer(t)["input_ids"] for t in heldout_prompts(config.domain, config.heldout_prompts, config=zoo.corpus)]
    draft, adapter, pending, replay, rows = base_draft, None, [], [], []
    failures_file = (run_dir / "failures.jsonl").open("a")

    def speculative() -> Any:
        """Speculative decoding with the current draft (the base draft plus the latest LoRA)."""
        return build("speculative", {"draft": "draft", "gamma": config.gamma},
                     ModelSet(target=target, drafts={"draft": draft}))

    for round_index in range(config.rounds + 1):
        baseline = build("autoregressive", {}, ModelSet(target=target))
        measured = []
        for index, prompt in enumerate(heldout):
            base = timed_generate(baseline, prompt, config.max_new_tokens, Sampling(), device, probe=target)
            trace = timed_generate(speculative(), prompt, config.max_new_tokens, Sampling(), device, probe=target)
            measured.append(PromptRecord(str(index), config.domain, [paired_turn(prompt, SideRecord.of(base), trace)]))
        held = summarize(measured)  # the same metrics as every sweep cell (harness.core.metrics)
        row = {"round": round_index, "adapter": adapter or "none", "heldout_alpha": held["alpha"],
               "heldout_tau": held["tau"], "heldout_speedup": held["speedup"], "failures": 0, "retrained": False}
        log(f"round {round_index}: held-out alpha {fmt(row['heldout_alpha'], 3)}, tau {row['heldout_tau']:.2f}, "
            f"speedup {row['heldout_speedup']:.2f} (adapter {row['adapter']})")
        if round_index == config.rounds:
            rows.append(row)
            break
        for text in stream_prompts(config.domain, config.prompts_per_round, config.prompt_chars,
                                   config.seed + round_index, zoo.corpus):
            prompt = tokenizer(text)["input_ids"]
            trace = speculative().generate(prompt, config.max_new_tokens, Sampling())
            if trace.alpha is not None and trace.alpha < config.threshold:
                case = {"round": round_index, "alpha": trace.alpha, "tokens": prompt + trace.tokens,
                        "corrected": [position for position in corrected_positions(len(prompt), trace.steps)
                                      if position < len(prompt) + len(trace.tokens)]}
                if case["corrected"]:
                    pending.append(case)
                    row["failures"] += 1
                    failures_file.write(json.dumps(case) + "\n")
                    failures_file.flush()
        if len(pending) >= config.retrain_every:
            cases = pending + replay
            out_dir = specsweep_home() / "artifacts" / "adaptive" / content_hash(
                [config.identity(), zoo.key(), cases])[:16]
            if not (out_dir / "adapter_config.json").exists():
                metrics = launch(train_loop, config, zoo, f"adaptive-r{round_index}", out_dir, log, cases=cases)
                log(f"round {round_index}: retrained on {len(cases)} cases, loss {metrics['loss_first']:.4f} -> "
                    f"{metrics['loss_last']:.4f}")
            replay = (replay + pending)[-config.replay:] if config.replay else []
            pending = []
            model = PeftModel.from_pretrained(load_model(config.draft, zoo, device, "draft").model, str(out_dir)).eval()
            draft = CausalLM(model, name="draft+lora", num_parameters=base_draft.num_parameters)
            adapter, row["retrained"] = out_dir.name, True
        rows.append(row)
    failures_file.close()
    write_adaptive_report(rows, config, run_dir)
    return rows


def write_adaptive_report(rows: list[dict[str, Any]], config: AdaptiveConfig, run_dir: Path) -> None:
    """rounds.csv, report.md and alpha.png for the rounds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    frame = pd.DataFrame(rows)
    frame.to_csv(run_dir / "rounds.csv", index=False)
    lines = [f"# Adaptive drafts: {config.name}", "",
             f"- domain {config.domain}; draft {config.draft.id}; target {config.target.id}; gamma {config.gamma}; "
             f"failure threshold alpha < {config.threshold}; retrain every {config.retrain_every} failures; "
             f"loss {config.loss}; replay buffer {config.replay}", "",
             "| round | adapter | held-out alpha | held-out tau | held-out speedup | failures logged | retrained |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['round']} | {row['adapter'][:8]} | {fmt(row['heldout_alpha'], 3)} | {row['heldout_tau']:.2f} | "
                     f"{row['heldout_speedup']:.2f} | {row['failures']} | {'yes' if row['retrained'] else 'no'} |")
    (run_dir / "report.md").write_text("\n".join(lines) + "\n")
    figure, axis = plt.subplots(figsize=(5, 3.2))
    axis.plot(frame["round"], frame["heldout_alpha"], marker="o", label="alpha")
    axis.set_xlabel("round")
    axis.set_ylabel("held-out alpha")
    twin = axis.twinx()
    twin.plot(frame["round"], frame["heldout_speedup"], marker="s", color="tab:orange", label="speedup")
    twin.set_ylabel("held-out speedup")
    axis.set_title(f"adaptive draft on {config.domain}")
    figure.tight_layout()
    figure.savefig(run_dir / "alpha.png", dpi=120)
    plt.close(figure)
