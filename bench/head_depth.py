"""EAGLE-2's head against EAGLE-3's: τ over tree shapes at equal verified tokens, and where each head loses.

Greedy, on the full zoo's held-out prompts (``--prompts`` per set, code and prose, 96 new tokens, float32), or with
``--target`` on a real model (e.g. ``pkg:smollm2-135m --dtype bfloat16``) on the first ``--prompts`` Spec-Bench
questions of each category in its chat template, split into the categories that copy their context
(translation, summarization, rag) and the rest (chat). For
each ``--shapes`` entry ``depth,top_k,total_tokens`` it prints τ (committed tokens per target pass) of ``eagle2``
and ``eagle3``; then, per head, the conditional acceptance at each depth of a depth-7 chain (accepted at depth d
given depth d - 1 was), and the teacher-forced top-1 agreement on the baseline's own continuations (the head's
first drafted token, read at every position). No timing: these counts do not depend on how busy the machine is.

    python bench/head_depth.py EAGLE_HEAD_DIR EAGLE3_HEAD_DIR [--prompts 12] [--shapes 5,1,6 5,2,16 7,4,16]
    python bench/head_depth.py EAGLE_HEAD_DIR EAGLE3_HEAD_DIR --target pkg:smollm2-135m --dtype bfloat16 --prompts 2

The head directories are trained artefacts (``$SPECSWEEP_HOME/artifacts/{eagle,eagle3}/<key>``), e.g. those of
``configs/train/eagle_zoo.yaml`` and ``configs/train/eagle3_zoo.yaml`` (or ``*_smollm2*.yaml``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from harness.core.corpus import heldout_prompts
from harness.core.models import ModelSpec, load_model, load_tokenizer
from harness.core.prompts import PromptSetSpec, conversation_ids, load_prompts
from harness.core.zoo_spec import ZooConfig
from strategies import ModelSet, Sampling, build
from strategies.eagle3_head import head_feature_layers, load_eagle3_lm
from strategies.eagle_head import load_head_lm

HEADS = {"eagle2": "head", "eagle3": "head3"}
NEW_TOKENS = 96
CHAIN_DEPTH = 7


def tau(models: ModelSet, name: str, shape: tuple[int, int, int], prompts: list[list[int]]) -> float:
    """Committed tokens per target pass of ``name`` with tree ``shape`` (depth, top_k, total_tokens)."""
    depth, top_k, total = shape
    strategy = build(name, {"head": HEADS[name], "depth": depth, "top_k": top_k, "total_tokens": total}, models)
    new = steps = 0
    for prompt in prompts:
        trace = strategy.generate(prompt, NEW_TOKENS, Sampling())
        new, steps = new + trace.new_tokens, steps + len(trace.steps)
    return new / steps


def depth_acceptance(models: ModelSet, name: str, prompts: list[list[int]]) -> list[float]:
    """P(depth d accepted | depth d - 1 accepted) in a depth-``CHAIN_DEPTH`` chain (a top-1 tree)."""
    strategy = build(name, {"head": HEADS[name], "depth": CHAIN_DEPTH, "top_k": 1, "total_tokens": CHAIN_DEPTH + 1},
                     models)
    reached, accepted = [0] * (CHAIN_DEPTH + 1), [0] * (CHAIN_DEPTH + 1)
    for prompt in prompts:
        for step in strategy.generate(prompt, NEW_TOKENS, Sampling()).steps:
            for depth in range(1, min(step.drafted, CHAIN_DEPTH) + 1):
                if step.accepted >= depth - 1:
                    reached[depth] += 1
                    accepted[depth] += step.accepted >= depth
    return [accepted[depth] / max(reached[depth], 1) for depth in range(1, CHAIN_DEPTH + 1)]


@torch.inference_mode()
def teacher_forced_top1(models: ModelSet, prompts: list[list[int]]) -> dict[str, float]:
    """Each head's top-1 agreement with the baseline's greedy continuation, read from the target's own features."""
    target = models.target.model
    layers = head_feature_layers(models.artifacts["head3"].model.config, int(target.config.num_hidden_layers))
    baseline = build("autoregressive", {}, models)
    hits, total = {name: 0 for name in HEADS}, 0
    for prompt in prompts:
        sequence = torch.tensor([prompt + baseline.generate(prompt, NEW_TOKENS, Sampling()).tokens])
        states = target(sequence, output_hidden_states=True).hidden_states
        features = {"eagle2": states[-1], "eagle3": torch.cat([states[index] for index in layers], -1)}
        gold = sequence[0, 2:][len(prompt) - 2:]  # entry t (feature t, token t + 1) predicts token t + 2
        for name, role in HEADS.items():
            head = models.artifacts[role].model
            logits = head(input_ids=sequence[:, 1:], features=features[name][:, :-1]).logits[0, :-1]
            hits[name] += int((logits.argmax(-1)[len(prompt) - 2:] == gold).sum())
        total += gold.numel()
    return {name: count / total for name, count in hits.items()}


COPYING = ("translation", "summarization", "rag")


def prompt_sets(target_id: str, tokenizer, zoo: ZooConfig, count: int) -> dict[str, list[list[int]]]:
    """Token ids of the prompts to decode, by set: the zoo's held-out code and prose, or Spec-Bench's first
    ``count`` questions per category (first turns, chat template) split into copying and chat categories."""
    if target_id.startswith("zoo:"):
        return {domain: [tokenizer(text)["input_ids"] for text in heldout_prompts(domain, count, config=zoo.corpus)]
                for domain in ("code", "prose")}
    spec = PromptSetSpec(name="specbench", source="specbench", per_category=count)
    sets: dict[str, list[list[int]]] = {"chat": [], "copying": []}
    for prompt in load_prompts(spec):
        ids = conversation_ids(tokenizer, spec, [prompt.turns[0]], 1024)
        sets["copying" if prompt.category in COPYING else "chat"].append(ids)
    return sets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("eagle_head", type=Path)
    parser.add_argument("eagle3_head", type=Path)
    parser.add_argument("--prompts", type=int, default=12,
                        help="held-out prompts per zoo set, or Spec-Bench questions per category")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 leaves a core to other work)")
    parser.add_argument("--target", default="zoo:target", help="the heads' target, e.g. pkg:smollm2-135m")
    parser.add_argument("--dtype", default="float32", help="the target's dtype (the heads run in it too)")
    parser.add_argument("--shapes", nargs="+", default=["5,1,6", "5,2,16", "7,4,16", "7,8,16"],
                        help="tree shapes depth,top_k,total_tokens")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    zoo, cpu = ZooConfig(), torch.device("cpu")
    spec = ModelSpec(args.target, dtype=args.dtype)
    target = load_model(spec, zoo, cpu, "target")
    tokenizer = load_tokenizer(spec, zoo)
    models = ModelSet(target=target, artifacts={"head": load_head_lm(args.eagle_head, target),
                                                "head3": load_eagle3_lm(args.eagle3_head, target)})
    sets = prompt_sets(args.target, tokenizer, zoo, args.prompts)
    print("tau by tree shape (depth, top_k, total_tokens): " + ", ".join(f"eagle2/eagle3 {domain}" for domain in sets))
    for raw in args.shapes:
        shape = tuple(int(value) for value in raw.split(","))
        cells = [f"{tau(models, 'eagle2', shape, prompts):.2f}/{tau(models, 'eagle3', shape, prompts):.2f}"
                 for prompts in sets.values()]
        print(f"  {shape}: " + "  ".join(cells), flush=True)
    for domain, prompts in sets.items():
        for name in HEADS:
            rates = " ".join(f"{rate:.2f}" for rate in depth_acceptance(models, name, prompts))
            print(f"{domain} {name}: acceptance at depths 1-{CHAIN_DEPTH} of a chain: {rates}", flush=True)
        agreement = teacher_forced_top1(models, prompts)
        print(f"{domain} teacher-forced top-1: " + ", ".join(f"{name} {rate:.3f}" for name, rate in agreement.items()))


if __name__ == "__main__":
    main()
