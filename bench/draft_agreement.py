"""How often does a draft pick the target's own next token on Spec-Bench? Teacher-forced top-1 agreement.

For the first question of each Spec-Bench category (in the target's chat template), the target answers greedily;
the draft then reads prompt plus answer in one forward, and each answer position counts as agreeing when the
draft's top token equals the target's. Printed per category: agreement with the draft's full head, with its
FR-Spec vocabulary subset (when the draft directory has ``vocab_subset.json``), and the share of the target's
tokens that lie in that subset. Separates a draft that does not know the text from a decoding problem: α in a
sweep cannot exceed what this shows for the first drafted token.

DRAFT_DIR may also be an EAGLE head (a directory with ``head.json``): the head then reads the target's own
features of the answer (teacher forcing, as in its training) and predicts each token from the feature before
the token before it, which is what its first drafted token does in decoding (EAGLE's α1 on these answers).

    python bench/draft_agreement.py TARGET_DIR DRAFT_DIR [--categories 8] [--new-tokens 48] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from harness.core.prompts import SPEC_BENCH_FILE
from strategies.eagle_head import HEAD_CONFIG, load_head


def first_question_per_category(limit: int) -> list[tuple[str, str]]:
    """(category, first turn) of the first question of each Spec-Bench category, in file order."""
    seen: dict[str, str] = {}
    for line in SPEC_BENCH_FILE.read_text().splitlines():
        row = json.loads(line)
        seen.setdefault(row["category"], row["turns"][0])
    return list(seen.items())[:limit]


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", type=Path)
    parser.add_argument("draft", type=Path)
    parser.add_argument("--categories", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--dtype", default="float32", help="the target's dtype while it answers (as in the sweep)")
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.target)
    answering = AutoModelForCausalLM.from_pretrained(args.target, dtype=getattr(torch, args.dtype)).eval()
    target = AutoModelForCausalLM.from_pretrained(args.target, dtype=torch.float32).eval()
    head_meta = args.draft / HEAD_CONFIG
    if head_meta.exists():
        head = load_head(args.draft, target).eval()
        subset_ids = json.loads(head_meta.read_text()).get("vocab_subset")

        def draft_logits(sequence: torch.Tensor) -> torch.Tensor:
            """Row t predicts token t + 1 (row 0, which no feature precedes, is zeros)."""
            features = target(sequence, output_hidden_states=True).hidden_states[-1]
            logits = head(input_ids=sequence[:, 1:], features=features[:, :-1]).logits  # predicts tokens 2..n
            return torch.cat([torch.zeros_like(logits[:, :1]), logits], dim=1)
    else:
        draft = AutoModelForCausalLM.from_pretrained(args.draft, dtype=torch.float32).eval()

        def draft_logits(sequence: torch.Tensor) -> torch.Tensor:
            return draft(sequence).logits
        subset_file = args.draft / "vocab_subset.json"
        subset_ids = json.loads(subset_file.read_text()) if subset_file.exists() else None
    subset = torch.tensor(subset_ids) if subset_ids else None
    totals = {"full": 0.0, "subset": 0.0, "in_subset": 0.0}
    questions = first_question_per_category(args.categories)
    for category, question in questions:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)["input_ids"]
        sequence = answering.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False)
        answer = sequence[0, prompt.shape[1]:]
        logits = draft_logits(sequence)[0, prompt.shape[1] - 1:-1]
        row = {"full": (logits.argmax(-1) == answer).float().mean().item()}
        if subset is not None:
            row["subset"] = (subset[logits[:, subset].argmax(-1)] == answer).float().mean().item()
            row["in_subset"] = torch.isin(answer, subset).float().mean().item()
        print(f"{category:18s} " + "  ".join(f"{name} {value:.2f}" for name, value in row.items()))
        for name, value in row.items():
            totals[name] += value
    print("mean               " + "  ".join(f"{name} {value / len(questions):.3f}" for name, value in totals.items()
                                          if subset is not None or name == "full"))


if __name__ == "__main__":
    main()
