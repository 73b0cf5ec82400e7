"""How often does a draft pick the target's own next token on Spec-Bench? Teacher-forced top-1 agreement.

For the first question of each Spec-Bench category (in the target's chat template), the target answers greedily;
the draft then reads prompt plus answer in one forward, and each answer position counts as agreeing when the
draft's top token equals the target's. Printed per category: agreement with the draft's full head, with its
FR-Spec vocabulary subset (when the draft directory has ``vocab_subset.json``), and the share of the target's
tokens that lie in that subset. Separates a draft that does not know the text from a decoding problem: α in a
sweep cannot exceed what this shows for the first drafted token.

    python bench/draft_agreement.py TARGET_DIR DRAFT_DIR [--categories 8] [--new-tokens 48]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from harness.prompts import SPEC_BENCH_FILE


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
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.target)
    target = AutoModelForCausalLM.from_pretrained(args.target, dtype=torch.float32).eval()
    draft = AutoModelForCausalLM.from_pretrained(args.draft, dtype=torch.float32).eval()
    subset_file = args.draft / "vocab_subset.json"
    subset = torch.tensor(json.loads(subset_file.read_text())) if subset_file.exists() else None
    totals = {"full": 0.0, "subset": 0.0, "in_subset": 0.0}
    questions = first_question_per_category(args.categories)
    for category, question in questions:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)["input_ids"]
        sequence = target.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False)
        answer = sequence[0, prompt.shape[1]:]
        logits = draft(sequence).logits[0, prompt.shape[1] - 1:-1]
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
