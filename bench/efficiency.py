"""Efficiency per strategy: the measured speedup against the bound its measured acceptance and forward costs allow,
eagerly and on the compiled path (``run.compile``: static KV cache, one CUDA graph per forward width), no Ray.

For each strategy, over the same prompts (greedy, batch 1, the median of ``--repeats`` runs per prompt):

- **measured speedup**: the baseline's wall time per token over the strategy's, both on the same path;
- **bound**: what the forwards alone allow. A token of the baseline costs ``t(1)``, one target forward of one
  token. A strategy's tokens cost its target verification calls, each priced at ``t(w̄)`` (the target's forward
  time at the strategy's mean verification width ``w̄``, interpolated between the widths timed apart by
  ``CausalLM.time_steps``), plus the seconds its draft models' decode forwards took in the run. The bound is
  ``t(1)`` over that cost per token: the speedup of a loop with no host work beyond the forwards. The acceptance
  (α, τ) enters through the number of verification calls per token (1 / τ) and the width (γ + 1 for a chain).
- **efficiency** = measured / bound.

``oracle`` rows (synthetic acceptance: free drafts right with a set probability) give the verification side's
efficiency surface over acceptance and γ.

``--floor`` adds, on CUDA, the launch/bandwidth floor of one baseline token: ``max(kernels × k, bytes / B)``,
where ``kernels`` is the number of CUDA kernels one 1-token target forward launches (counted by torch.profiler),
``k`` the time per kernel of a CUDA graph of back-to-back minimal kernels, ``bytes`` the weights plus the KV cache
a token reads, and ``B`` the bandwidth of a large device-to-device copy (both measured on the spot).

    python bench/efficiency.py --zoo ZOO_DIR --head EAGLE_HEAD_DIR --modes eager compiled --floor --out zoo.json
    python bench/efficiency.py --shape smollm2 --dtype bfloat16 --modes eager compiled --floor --out smollm2.json
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from harness.core.lm import CausalLM, synchronize
from harness.core.static_lm import compiled
from strategies import ModelSet, Sampling, build
from strategies.eagle_head import load_head_lm

sys.path.insert(0, str(Path(__file__).parent))
from hot_path import SMOLLM2_SHAPE, load_dir, prompts_for, random_models  # noqa: E402


def interpolate(widths: list[int], seconds: list[float], width: float) -> float:
    """Forward seconds at ``width`` tokens, linear between the timed widths (clamped at the ends)."""
    if width <= widths[0]:
        return seconds[0]
    for (low, low_s), (high, high_s) in zip(zip(widths, seconds), zip(widths[1:], seconds[1:])):
        if width <= high:
            return low_s + (high_s - low_s) * (width - low) / (high - low)
    return seconds[-1]


def run_strategy(strategy, prompts: list[list[int]], new_tokens: int, repeats: int,
                 device: torch.device) -> dict[str, Any]:
    """Median-of-``repeats`` wall seconds per prompt, and the first run's traces summed: tokens, steps,
    drafted, accepted, target calls and tokens, draft decode seconds."""
    strategy.generate(prompts[0], new_tokens, Sampling())  # warm-up (and, compiled, graph capture)
    totals = {"seconds": 0.0, "tokens": 0, "steps": 0, "drafted": 0, "accepted": 0, "target_calls": 0,
              "target_tokens": 0, "draft_seconds": 0.0, "outputs": []}
    for prompt in prompts:
        runs = []
        for _ in range(repeats):
            synchronize(device)
            started = time.perf_counter()
            trace = strategy.generate(prompt, new_tokens, Sampling())
            synchronize(device)
            runs.append((time.perf_counter() - started, trace))
        totals["seconds"] += statistics.median(seconds for seconds, _ in runs)
        trace = runs[0][1]
        totals["tokens"] += trace.new_tokens
        totals["steps"] += len(trace.steps)
        totals["drafted"] += trace.drafted
        totals["accepted"] += trace.accepted
        target = trace.forward.get("target", {})
        totals["target_calls"] += target.get("decode_calls", 0)
        totals["target_tokens"] += target.get("decode_tokens", 0)
        totals["draft_seconds"] += sum(stats.get("decode_seconds", 0.0) for name, stats in trace.forward.items()
                                       if name != "target")
        totals["outputs"].append(trace.tokens)
    return totals


def kernels_per_forward(lm: CausalLM, context: int) -> int:
    """CUDA kernels launched by one eager 1-token forward of ``lm`` after ``context`` cached positions."""
    from torch.profiler import ProfilerActivity, profile

    ids = [index % lm.vocab_size for index in range(context + 1)]
    plain = CausalLM(lm.model, "probe")
    plain.prefill(ids[:context])
    synchronize(lm.device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        plain.extend(ids[context:])
        synchronize(lm.device)
    return sum(event.count for event in prof.key_averages() if event.device_type == torch.autograd.DeviceType.CUDA)


def kernel_floor_s(device: torch.device, kernels: int = 2000) -> float:
    """Seconds per kernel of a CUDA graph of ``kernels`` back-to-back one-element additions."""
    x = torch.zeros(1, device=device)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        x.add_(1)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(kernels):
            x.add_(1)
    graph.replay()
    torch.cuda.synchronize(device)
    times = []
    for _ in range(5):
        started = time.perf_counter()
        graph.replay()
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
    return min(times) / kernels


def copy_bandwidth(device: torch.device, megabytes: int = 1024) -> float:
    """Bytes per second moved by a large device-to-device copy (read plus write)."""
    source = torch.empty(megabytes * 2**20, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    torch.cuda.synchronize(device)
    times = []
    for _ in range(5):
        started = time.perf_counter()
        target.copy_(source)
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
    return 2 * source.numel() / min(times)


def floor(lm: CausalLM, context: int) -> dict[str, float]:
    """The launch/bandwidth floor of one baseline token of ``lm`` (module docstring)."""
    kernels = kernels_per_forward(lm, context)
    per_kernel = kernel_floor_s(lm.device)
    weights = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    config = lm.model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * context * lm.model.dtype.itemsize
    bandwidth = copy_bandwidth(lm.device)
    launch_s, bytes_s = kernels * per_kernel, (weights + kv) / bandwidth
    return {"kernels": kernels, "per_kernel_us": per_kernel * 1e6, "bytes": weights + kv,
            "bandwidth_gb_s": bandwidth / 1e9, "launch_floor_ms": launch_s * 1e3, "bandwidth_floor_ms": bytes_s * 1e3,
            "floor_ms": max(launch_s, bytes_s) * 1e3}


def strategy_list(mode: str, gammas: list[int], acceptances: list[float], has_head: bool,
                  device: torch.device) -> list[tuple[str, str, dict]]:
    """(label, strategy, params) of every row after the baseline; transformers' peers (which decode through
    ``generate()``, whichever path specsweep's rows take) in the eager mode only."""
    rows = []
    for gamma in gammas:
        rows.append((f"speculative γ{gamma}", "speculative", {"draft": "draft", "gamma": gamma}))
    if has_head:
        rows += [("eagle γ3", "eagle", {"head": "head", "gamma": 3}),
                 ("eagle2 10/4/3", "eagle2", {"head": "head", "total_tokens": 10, "depth": 4, "top_k": 3})]
    rows.append(("prompt_lookup 10", "prompt_lookup", {"num_tokens": 10, "max_ngram": 2}))
    for gamma in gammas:
        for acceptance in acceptances:
            rows.append((f"oracle γ{gamma} a{acceptance:g}", "oracle", {"gamma": gamma, "acceptance": acceptance}))
    if mode != "eager":
        return rows
    rows.append(("hf_greedy", "hf_greedy", {}))
    rows.append((f"hf_assisted {gammas[0]}", "hf_assisted",
                 {"draft": "draft", "num_assistant_tokens": gammas[0], "confidence_threshold": 0.0}))
    return rows


def measure_mode(mode: str, target_model, draft_model, head_dir: Path | None, prompts: list[list[int]],
                 args: argparse.Namespace, reference: list[list[int]] | None, divergences) -> list[dict[str, Any]]:
    """Every row on one path (``eager``: ``CausalLM``; ``compiled``: ``StaticCausalLM``)."""
    device = torch.device(args.device)
    target, draft = CausalLM(target_model, "target"), CausalLM(draft_model, "draft")
    if mode == "compiled":
        target, draft = compiled(target), compiled(draft)
    if mode == "peer":
        head_dir = None
    artifacts = {}
    if head_dir is not None:
        head = load_head_lm(head_dir, target)
        artifacts["head"] = compiled(head) if mode == "compiled" else head
    models = ModelSet(target=target, drafts={"draft": draft}, artifacts=artifacts)
    widths = list(range(1, args.max_width + 1))
    forward_s = target.time_steps(widths, context=args.prompt_length, repeats=max(5, 3 * args.repeats))
    print(f"[{mode}] target forward ms by width: " + ", ".join(f"{w}:{s * 1e3:.3f}" for w, s in zip(widths, forward_s)),
          flush=True)
    rows = []
    baseline = run_strategy(build("autoregressive", {}, models), prompts, args.new_tokens, args.repeats, device)
    base_per_token = baseline["seconds"] / baseline["tokens"]
    reference = reference or baseline["outputs"]
    listed = [("baseline", "autoregressive", {})] + strategy_list(mode, args.gammas, args.acceptances,
                                                                   head_dir is not None, device)
    if args.rows:
        listed = [row for row in listed if row[0] == "baseline" or re.search(args.rows, row[0])]
    if mode == "peer":  # transformers' compiled generate(), run last: compiling takes the longest
        listed = [("baseline", "autoregressive", {}), ("hf_greedy compile", "hf_greedy", {"compile": True})]
    for label, name, params in listed:
        try:
            strategy = build(name, params, models)
            if hasattr(strategy, "prepare"):
                strategy.prepare(prompts, args.new_tokens)
            totals = baseline if label == "baseline" else run_strategy(strategy, prompts, args.new_tokens,
                                                                     args.repeats, device)
        except Exception as error:  # one failing row must not lose the others
            print(f"[{mode}] {label}: FAILED {type(error).__name__}: {error}", flush=True)
            traceback.print_exc()
            rows.append({"mode": mode, "strategy": label, "error": f"{type(error).__name__}: {error}"})
            continue
        tokens = totals["tokens"]
        per_token = totals["seconds"] / tokens
        row = {"mode": mode, "strategy": label, "ms_per_token": per_token * 1e3, "tokens_per_s": 1 / per_token,
               "speedup": base_per_token / per_token, "tau": tokens / max(1, totals["steps"]),
               "alpha": totals["accepted"] / totals["drafted"] if totals["drafted"] else None}
        if totals["target_calls"] and not name.startswith("hf_"):
            width = totals["target_tokens"] / totals["target_calls"]
            cost = totals["target_calls"] * interpolate(widths, forward_s, width) + totals["draft_seconds"]
            row.update(mean_width=width, bound=forward_s[0] / (cost / tokens))
            row["efficiency"] = row["speedup"] / row["bound"]
        same = [out == ref for out, ref in zip(totals["outputs"], reference)]
        row["exact_prompts"] = f"{sum(same)}/{len(same)}"
        if not all(same) and divergences is not None:
            row["divergences"] = divergences(totals["outputs"], reference)
        rows.append(row)
        print(f"[{mode}] " + json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}),
              flush=True)
    rows.insert(0, {"mode": mode, "strategy": "target forward by width", "widths": widths,
                    "forward_ms": [s * 1e3 for s in forward_s]})
    rows.append({"mode": mode, "reference_outputs": reference})
    return rows


def divergence_classifier(target_model, dtype: torch.dtype, prompts: list[list[int]]):
    """For bfloat16/float16 runs: a function classifying each prompt's first divergence as a tie or real (with a
    float32 copy of the target); None in float32, where any difference is an error."""
    if dtype == torch.float32:
        return None
    from copy import deepcopy

    from harness.core.divergence import classify

    reference_model = deepcopy(target_model).float()
    eos = next(iter(CausalLM(target_model, "t").eos_token_id), 0)

    def divergences(outputs: list[list[int]], reference: list[list[int]]) -> dict[str, int]:
        kinds = {"tie": 0, "real": 0}
        for prompt, out, ref in zip(prompts, outputs, reference):
            if out == ref:
                continue
            position = next((i for i, (a, b) in enumerate(zip(out, ref)) if a != b), min(len(out), len(ref)))
            kinds[classify(reference_model, target_model, prompt, ref, out, position, eos).kind] += 1
        return kinds

    return divergences


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--zoo", type=Path, help="a built zoo directory (its target and --draft-name)")
    source.add_argument("--shape", choices=["smollm2"], help="random weights in a known model's shape")
    parser.add_argument("--draft-name", default="draft-1l")
    parser.add_argument("--draft-layers", type=int, default=2, help="with --shape: the early-exit draft's depth")
    parser.add_argument("--head", type=Path, help="an EAGLE head directory for --zoo's target (adds eagle rows)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--modes", nargs="+", default=["eager", "compiled", "peer"], choices=["eager", "compiled", "peer"],
                        help="peer: transformers' generate() with its static cache and torch.compile (CUDA only)")
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--gammas", type=int, nargs="+", default=[3, 5])
    parser.add_argument("--acceptances", type=float, nargs="*", default=[0.6, 0.9])
    parser.add_argument("--max-width", type=int, default=11, help="target forwards timed at widths 1..this")
    parser.add_argument("--rows", help="only the rows whose label matches this regular expression (and the baseline)")
    parser.add_argument("--floor", action="store_true", help="also measure the launch/bandwidth floor (CUDA)")
    parser.add_argument("--out", type=Path, help="write every row as JSON here")
    args = parser.parse_args()

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.zoo:
        target_model, draft_model = load_dir(args.zoo / "target", dtype, device), load_dir(args.zoo / args.draft_name,
                                                                                         dtype, device)
    else:
        target_model, draft_model = random_models(SMOLLM2_SHAPE, args.draft_layers, dtype, device)
    prompts = prompts_for(target_model.config.vocab_size, args.prompts, args.prompt_length)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}, {args.dtype}, {len(prompts)} prompts x {args.new_tokens} tokens, "
          f"median of {args.repeats}", flush=True)
    divergences = divergence_classifier(target_model, dtype, prompts)
    rows, reference = [], None
    for mode in args.modes:
        if mode == "compiled" and device.type != "cuda":
            print("run.compile: no CUDA device: the compiled rows run the static cache eagerly (no graphs)", flush=True)
        if mode == "peer" and device.type != "cuda":
            print("peer: transformers compiles on accelerators only; skipped on the CPU", flush=True)
            continue
        try:
            mode_rows = measure_mode(mode, target_model, draft_model, args.head, prompts, args, reference,
                                     divergences)
        except Exception as error:  # the next mode may still run
            print(f"[{mode}] FAILED {type(error).__name__}: {error}", flush=True)
            traceback.print_exc()
            continue
        reference = reference or mode_rows[-1]["reference_outputs"]
        rows += [row for row in mode_rows if "reference_outputs" not in row]
    if args.floor and device.type == "cuda":  # last: the profiler it runs slows what follows it
        rows.append({"mode": "-", "strategy": "floor", **floor(CausalLM(target_model, "target"), args.prompt_length)})
        print(f"floor {json.dumps(rows[-1])}", flush=True)
    by_key = {(row["mode"], row["strategy"]): row for row in rows}
    for key in [("compiled", "speculative γ3"), ("compiled", "speculative γ5")]:
        peer = by_key.get(("eager", f"hf_assisted {args.gammas[0]}"))
        if key in by_key and peer and "tokens_per_s" in peer and "tokens_per_s" in by_key[key]:
            print(f"{key[1]} compiled / hf_assisted {args.gammas[0]}: "
                  f"{by_key[key]['tokens_per_s'] / peer['tokens_per_s']:.2f}x tokens/s", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"device": name, "torch": torch.__version__, "dtype": args.dtype,
                                        "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
