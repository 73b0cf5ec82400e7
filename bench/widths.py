"""What a k-token forward costs against a 1-token one, per dtype, on this machine.

Speculative decoding pays when verifying several tokens costs little more than
decoding one. On a GPU that holds until the GEMMs stop being bandwidth-bound; on a
CPU it depends on the dtype: on 2 cores with AVX-512 BF16, a bfloat16 small-M GEMM
costs about the same for 1 to 4 rows while a float32 one grows with the rows.
For each dtype this times the target's decode forward of each width after a fixed
context (``CausalLM.time_steps``: medians over rounds that time every width once,
after an untimed warm-up forward) and prints milliseconds and the ratio to one
token. ``schedule: adaptive`` measures the same costs for its own cell, in the
cell's dtype.

    python bench/widths.py MODEL_DIR [--dtypes float32 bfloat16] [--widths 1 2 3 4 6 8 12 16]
                           [--context 256] [--repeats 7] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from harness.core.lm import CausalLM


def widths_table(model_dir: Path, dtypes: list[str], widths: list[int], context: int,
                 repeats: int) -> dict[str, list[float]]:
    """Median seconds of a decode forward of each width, per dtype."""
    table = {}
    for dtype in dtypes:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
        lm = CausalLM(model, "target")
        lm.time_steps([1], context, 1)  # untimed: the first forwards after loading run slow
        table[dtype] = lm.time_steps(widths, context, repeats)
        del lm, model
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--widths", nargs="+", type=int, default=[1, 2, 3, 4, 6, 8, 12, 16])
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    table = widths_table(args.model_dir, args.dtypes, args.widths, args.context, args.repeats)
    print(f"{args.model_dir.name}: decode forward after a {args.context}-token context, median of {args.repeats} "
          f"rounds, {torch.get_num_threads()} threads, torch {torch.__version__}, {platform.processor() or 'cpu'}")
    print("| dtype | " + " | ".join(f"{w} tok" for w in args.widths) + " |")
    print("|---|" + "---|" * len(args.widths))
    for dtype, seconds in table.items():
        print(f"| {dtype} ms | " + " | ".join(f"{1e3 * s:.1f}" for s in seconds) + " |")
        print(f"| {dtype} / 1 tok | " + " | ".join(f"{s / seconds[0]:.2f}" for s in seconds) + " |")
    if args.json:
        args.json.write_text(json.dumps({"model": str(args.model_dir), "context": args.context,
                                         "repeats": args.repeats, "widths": args.widths,
                                         "threads": torch.get_num_threads(), "torch": torch.__version__,
                                         "seconds": table}, indent=2) + "\n")


if __name__ == "__main__":
    main()
