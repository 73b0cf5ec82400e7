"""Activated LoRA's multi-turn case: the base model answers, then the adapter is invoked on the same conversation.

For each held-out prompt the base model answers (greedy, ``--answer-tokens``),
then the adapter is invoked (the invocation string appended) and generates
``--adapter-tokens``:

- aLoRA keeps the base turn's KV cache (its weights are inactive before the
  invocation) and prefills only the invocation tokens;
- LoRA must recompute the whole conversation with its weights (a full prefill);
- aLoRA with speculative decoding: the draft carries its own aLoRA, and both
  the target's and the draft's base-turn caches are reused; the draft proposes
  ``--gamma`` tokens per step and the aLoRA target verifies them.

Reported per arm: adapter-turn prefill time and total adapter-turn latency
(prefill + decode), and the prefill time aLoRA saves. The script also checks
that aLoRA's adapter-turn tokens with the reused cache equal those of a full
recompute with the aLoRA (the reuse is exact).

    python3 bench/alora_multiturn.py configs/train/alora_zoo.yaml --prompts 8
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch


def decode(model, cache, logits: torch.Tensor, count: int, adapted: bool) -> list[int]:
    """Greedy tokens from ``logits`` on, extending ``cache`` one token at a time."""
    tokens = []
    for _ in range(count):
        token = int(logits.argmax(-1))
        tokens.append(token)
        extra = {"alora_offsets": [1]} if adapted else {}
        logits = model(input_ids=torch.tensor([[token]]), past_key_values=cache, use_cache=True, **extra).logits[0, -1]
    return tokens


@torch.inference_mode()
def speculative_turn(alora, draft_alora, target_cache, draft_cache, invocation: list[int], conversation_ids: list[int],
                     adapter_tokens: int, gamma: int) -> tuple[list[int], float]:
    """The adapter turn by speculative decoding (specsweep's decode loop), both models continuing their base-turn
    caches: the target extends its cache by the invocation, the draft feeds it with its first proposal."""
    from harness.core.lm import CausalLM
    from strategies.engine import decode
    from strategies.methods.speculative import DraftModelProposer
    from strategies.sampling import Sampling
    from training.alora import Activated

    target, draft = CausalLM(Activated(alora), "target+alora"), CausalLM(Activated(draft_alora), "draft+alora")
    target.cache, draft.cache = target_cache, draft_cache
    started = time.perf_counter()
    start = target.extend(invocation)
    tokens, _ = decode(target, DraftModelProposer(draft, gamma, continue_cache=True), conversation_ids + invocation,
                       adapter_tokens, Sampling(), start=start)
    return tokens[:adapter_tokens], time.perf_counter() - started


@torch.inference_mode()
def conversation(alora, lora, draft_alora, ids: list[int], invocation: list[int], answer_tokens: int,
                 adapter_tokens: int, gamma: int) -> dict:
    """Time one base turn + adapter turn with each adapter; return the timings and the tokens."""
    from transformers import DynamicCache

    cache = DynamicCache()
    logits = alora(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True).logits[0, -1]
    answer = decode(alora, cache, logits, answer_tokens, adapted=False)
    # The cache now holds the prompt and the whole answer, computed by the base weights.
    # Copies for the speculative arm: the target's cache and the draft's own pass over the same conversation.
    spec_cache, draft_cache = copy.deepcopy(cache), DynamicCache()
    draft_alora(input_ids=torch.tensor([ids + answer]), past_key_values=draft_cache, use_cache=True)
    started = time.perf_counter()
    logits = alora(input_ids=torch.tensor([invocation]), past_key_values=cache, use_cache=True,
                   alora_offsets=[len(invocation)]).logits[0, -1]
    alora_prefill = time.perf_counter() - started
    alora_tokens = decode(alora, cache, logits, adapter_tokens, adapted=True)
    alora_total = time.perf_counter() - started

    full = ids + answer + invocation
    started = time.perf_counter()
    cache = DynamicCache()
    logits = lora(input_ids=torch.tensor([full]), past_key_values=cache, use_cache=True).logits[0, -1]
    lora_prefill = time.perf_counter() - started
    decode(lora, cache, logits, adapter_tokens, adapted=False)
    lora_total = time.perf_counter() - started

    cache = DynamicCache()
    logits = alora(input_ids=torch.tensor([full]), past_key_values=cache, use_cache=True).logits[0, -1]
    recomputed = decode(alora, cache, logits, adapter_tokens, adapted=True)

    spec_tokens, spec_total = speculative_turn(alora, draft_alora, spec_cache, draft_cache, invocation, ids + answer,
                                               adapter_tokens, gamma)
    return {"conversation_tokens": len(full), "alora_prefill_s": alora_prefill, "alora_total_s": alora_total,
            "lora_prefill_s": lora_prefill, "lora_total_s": lora_total, "alora_speculative_total_s": spec_total,
            "reuse_exact": alora_tokens == recomputed,
            # the decode loop stops at an EOS, the plain loops above do not
            "speculative_exact": spec_tokens == alora_tokens[:len(spec_tokens)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default="configs/train/alora_zoo.yaml")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--answer-tokens", type=int, default=64)
    parser.add_argument("--adapter-tokens", type=int, default=32)
    parser.add_argument("--gamma", type=int, default=4)
    args = parser.parse_args()

    from harness.core.corpus import heldout_prompts
    from harness.core.models import load_tokenizer
    from harness.core.zoo_spec import ZooConfig
    from training.alora import invocation_ids, load_variant
    from training.artifacts import build_artifact, load_train_config

    torch.set_num_threads(2)
    zoo = ZooConfig()
    request = load_train_config(args.config, "config", Path.cwd(), zoo, expected_kind="alora")
    build_artifact(request)
    device = torch.device("cpu")
    alora = load_variant(request.directory, request.config, zoo, "alora", device)
    lora = load_variant(request.directory, request.config, zoo, "lora", device)
    draft_alora = load_variant(request.directory, request.config, zoo, "draft_alora", device)
    tokenizer = load_tokenizer(request.config.target, zoo)
    invocation = invocation_ids(tokenizer, request.config.invocation)
    prompts = [tokenizer(text)["input_ids"] for text in heldout_prompts("prose", args.prompts + 1, config=zoo.corpus)]
    conversation(alora, lora, draft_alora, prompts[0], invocation, 8, 4, args.gamma)  # warm-up
    rows = [conversation(alora, lora, draft_alora, ids, invocation, args.answer_tokens, args.adapter_tokens, args.gamma)
            for ids in prompts[1:]]
    checks = ("reuse_exact", "speculative_exact")
    summary = {key: statistics.mean(row[key] for row in rows) for key in rows[0] if key not in checks}
    summary.update({key: all(row[key] for row in rows) for key in checks})
    summary["prefill_saved"] = 1 - summary["alora_prefill_s"] / summary["lora_prefill_s"]
    summary["latency_saved"] = 1 - summary["alora_total_s"] / summary["lora_total_s"]
    summary["speculative_speedup_over_alora"] = summary["alora_total_s"] / summary["alora_speculative_total_s"]
    print(json.dumps({"prompts": len(rows), **summary}, indent=2))


if __name__ == "__main__":
    main()
