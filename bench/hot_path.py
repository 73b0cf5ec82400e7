"""Decode-loop overhead: specsweep's strategies against transformers' ``generate()`` on identical models, no Ray.

Every row times one strategy over the same prompts (greedy, batch 1, the median of
``--repeats`` runs per prompt) and reports ms per token and forward calls per
token, so the cost of the loop around the model shows apart from the model:

- ``baseline`` vs ``hf_greedy``: specsweep's autoregressive loop against ``generate()``;
- ``speculative`` vs ``hf_assisted`` with the same draft, γ and a constant schedule
  (confidence threshold 0, so both draft exactly γ tokens per step);
- ``prompt_lookup`` vs ``hf_prompt_lookup``.

``--profile`` adds a cProfile of one baseline and one ``generate()`` run (top
functions by own time) and torch.profiler operator counts per generated token.

    python bench/hot_path.py --zoo DIR --device cuda                      # zoo target + draft-1l (float32)
    python bench/hot_path.py --shape smollm2 --dtype bfloat16 --profile   # random weights, SmolLM2-135M's shape
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from harness.core.lm import CausalLM, synchronize
from strategies import ModelSet, Sampling, build

SMOLLM2_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0,
                     tie_word_embeddings=True)


def random_models(shape: dict, draft_layers: int, dtype: torch.dtype, device: torch.device):
    """A randomly initialised Llama of ``shape`` and its first ``draft_layers`` layers as a draft (shared weights)."""
    torch.manual_seed(0)
    target = LlamaForCausalLM(LlamaConfig(**shape)).to(device=device, dtype=dtype).eval()
    draft = LlamaForCausalLM(LlamaConfig(**{**shape, "num_hidden_layers": draft_layers})).to(device=device, dtype=dtype)
    draft.load_state_dict(target.state_dict(), strict=False)
    return target, draft.eval()


def load_dir(path: Path, dtype: torch.dtype, device: torch.device):
    """A saved causal LM on ``device`` in ``dtype``."""
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()


def prompts_for(vocab: int, count: int, length: int, seed: int = 1) -> list[list[int]]:
    """``count`` prompts of ``length`` ids; each repeats its first half so that prompt lookup finds matches."""
    generator = torch.Generator().manual_seed(seed)
    prompts = []
    for _ in range(count):
        half = torch.randint(5, vocab, (length // 2,), generator=generator).tolist()
        prompts.append(half + half)
    return prompts


def timed_run(strategy, prompt: list[int], new_tokens: int, device: torch.device):
    """One synchronised ``generate`` call: (seconds, trace)."""
    synchronize(device)
    started = time.perf_counter()
    trace = strategy.generate(prompt, new_tokens, Sampling())
    synchronize(device)
    return time.perf_counter() - started, trace


def measure(label: str, strategy, prompts: list[list[int]], new_tokens: int, repeats: int,
            device: torch.device) -> dict:
    """Median-of-``repeats`` seconds per prompt for ``strategy``; totals over the prompts."""
    timed_run(strategy, prompts[0], new_tokens, device)  # warm-up
    seconds, tokens, target_calls, outputs, steps = 0.0, 0, 0, [], 0
    for prompt in prompts:
        runs = [timed_run(strategy, prompt, new_tokens, device) for _ in range(repeats)]
        seconds += statistics.median(run[0] for run in runs)
        trace = runs[0][1]
        tokens += trace.new_tokens
        target_calls += trace.forward["target"]["calls"]
        steps += len(trace.steps)
        outputs.append(trace.tokens)
    return {"strategy": label, "ms_per_token": 1e3 * seconds / tokens, "tokens_per_s": tokens / seconds,
            "target_calls_per_token": target_calls / tokens, "tau": tokens / max(1, steps), "outputs": outputs}


def cprofile_top(strategy, prompt: list[int], new_tokens: int, rows: int) -> str:
    """cProfile of one run: the ``rows`` functions with the most own time."""
    profiler = cProfile.Profile()
    profiler.enable()
    strategy.generate(prompt, new_tokens, Sampling())
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(rows)
    return out.getvalue()


def operator_counts(strategy, prompt: list[int], new_tokens: int) -> dict:
    """torch.profiler totals for one run: operator calls, host µs and device µs, per generated token."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        trace = strategy.generate(prompt, new_tokens, Sampling())
    events = prof.key_averages()
    per_token = max(1, trace.new_tokens)
    top = sorted(events, key=lambda event: event.self_cpu_time_total, reverse=True)[:8]
    return {
        "aten_calls_per_token": sum(event.count for event in events if event.key.startswith("aten::")) / per_token,
        "host_self_us_per_token": sum(event.self_cpu_time_total for event in events) / per_token,
        "device_self_us_per_token": sum(getattr(event, "self_device_time_total", 0) for event in events) / per_token,
        "top_host_ops": [(event.key, event.count, round(event.self_cpu_time_total / per_token, 1)) for event in top],
    }


def verify_widths(lm: CausalLM, widths: list[int], context: int, repeats: int) -> list[dict]:
    """Median seconds of one ``extend`` of ``width`` tokens on a ``context``-position cache, four ways.

    ``plain`` is what ``speculative`` and ``prompt_lookup`` call, ``hidden`` adds
    ``output_hidden_states`` (what ``eagle`` calls), ``hf_inputs`` calls the
    model directly with the inputs ``generate()`` passes (a 2-D all-ones mask and
    ``cache_position``), and ``no_cudnn`` is ``plain`` with cuDNN's attention
    kernel excluded. The cache is cropped back after each call.
    """
    ids = [index % lm.vocab_size for index in range(context + max(widths))]
    lm.prefill(ids[:context])
    rows = []
    for width in widths:
        new = ids[context:context + width]

        def plain() -> None:
            lm.extend(new)

        def hidden() -> None:
            lm.extend(new, output_hidden_states=True)

        def hf_inputs() -> None:
            input_ids = torch.as_tensor([new], device=lm.device)
            positions = torch.arange(context, context + width, device=lm.device)
            mask = torch.ones((1, context + width), dtype=torch.long, device=lm.device)
            with torch.inference_mode():
                lm.model(input_ids=input_ids, attention_mask=mask, cache_position=positions, use_cache=True,
                         **{lm.cache_argument: lm.cache})

        def no_cudnn() -> None:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
                lm.extend(new)

        row = {"width": width}
        for name, call in [("plain", plain), ("hidden", hidden), ("hf_inputs", hf_inputs), ("no_cudnn", no_cudnn)]:
            times = []
            for _ in range(repeats):
                synchronize(lm.device)
                started = time.perf_counter()
                call()
                synchronize(lm.device)
                times.append(time.perf_counter() - started)
                lm.crop(context)
            row[name + "_ms"] = 1e3 * statistics.median(times)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--zoo", type=Path, help="a built zoo directory (its target and --draft-name)")
    source.add_argument("--shape", choices=["smollm2"], help="random weights in a known model's shape")
    parser.add_argument("--draft-name", default="draft-1l")
    parser.add_argument("--draft-layers", type=int, default=2, help="with --shape: the early-exit draft's depth")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gammas", type=int, nargs="+", default=[3, 5])
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--without-forward-sync", action="store_true",
                        help="diagnostic: run the table again with the per-forward timer syncs of CausalLM and the "
                             "hooks of the peers turned off, to price them")
    parser.add_argument("--widths", type=int, nargs="*", default=[1, 4, 11],
                        help="also time single target forwards of these many tokens (see verify_widths)")
    parser.add_argument("--out", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.zoo:
        target_model = load_dir(args.zoo / "target", dtype, device)
        draft_model = load_dir(args.zoo / args.draft_name, dtype, device)
    else:
        target_model, draft_model = random_models(SMOLLM2_SHAPE, args.draft_layers, dtype, device)
    target, draft = CausalLM(target_model, "target"), CausalLM(draft_model, "draft")
    models = ModelSet(target=target, drafts={"draft": draft})
    prompts = prompts_for(target.vocab_size, args.prompts, args.prompt_length)

    pairs = [("baseline", build("autoregressive", {}, models)),
             ("hf_greedy", build("hf_greedy", {}, models))]
    for gamma in args.gammas:
        pairs += [(f"speculative γ{gamma}", build("speculative", {"draft": "draft", "gamma": gamma}, models)),
                  (f"hf_assisted {gamma}", build("hf_assisted", {"draft": "draft", "num_assistant_tokens": gamma,
                                                                 "confidence_threshold": 0.0}, models))]
    pairs += [("prompt_lookup 10", build("prompt_lookup", {"num_tokens": 10, "max_ngram": 2}, models)),
              ("hf_prompt_lookup 10", build("hf_prompt_lookup", {"num_tokens": 10, "max_ngram": 2}, models))]

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}, {args.dtype}, {len(prompts)} prompts x {args.new_tokens} tokens, median of {args.repeats}")
    if args.widths:
        for row in verify_widths(target, args.widths, context=512, repeats=max(5, 4 * args.repeats)):
            print("target forward of {width:>2} tokens on 512 cached: plain {plain_ms:.2f} ms, hidden {hidden_ms:.2f} ms, "
                  "hf_inputs {hf_inputs_ms:.2f} ms, no_cudnn {no_cudnn_ms:.2f} ms".format(**row))
    rows = table(pairs, prompts, args)
    if args.without_forward_sync:
        import harness.core.lm
        import strategies.methods.hf_peers

        harness.core.lm.synchronize = strategies.methods.hf_peers.synchronize = lambda device: None
        print("\nagain, without the per-forward timer syncs:")
        table(pairs, prompts, args)
    if args.profile:
        for label, strategy in pairs[:2]:
            print(f"\n== {label}: torch.profiler per token", json.dumps(operator_counts(strategy, prompts[0],
                                                                                      args.new_tokens)))
            print(f"== {label}: cProfile\n" + cprofile_top(strategy, prompts[0], args.new_tokens, 18))
    if args.out:
        args.out.write_text(json.dumps([{k: v for k, v in row.items() if k != "outputs"} for row in rows], indent=1))


def table(pairs: list, prompts: list[list[int]], args: argparse.Namespace) -> list[dict]:
    """Measure every strategy in ``pairs`` and print the table and the specsweep / transformers ratios."""
    device = torch.device(args.device)
    rows = [measure(label, strategy, prompts, args.new_tokens, args.repeats, device) for label, strategy in pairs]
    reference = rows[0]["outputs"]
    print(f"{'strategy':<22}{'ms/token':>10}{'tok/s':>9}{'calls/tok':>11}{'tau':>7}  match")
    for row in rows:
        match = sum(a == b for a, b in zip(row["outputs"], reference)) / len(reference)
        row["match"] = match
        print(f"{row['strategy']:<22}{row['ms_per_token']:>10.3f}{row['tokens_per_s']:>9.1f}"
              f"{row['target_calls_per_token']:>11.3f}{row['tau']:>7.2f}  {match:.2f}")
    by_label = {row["strategy"]: row for row in rows}
    for ours, theirs in [("baseline", "hf_greedy"), *[(f"speculative γ{g}", f"hf_assisted {g}") for g in args.gammas],
                         ("prompt_lookup 10", "hf_prompt_lookup 10")]:
        print(f"{ours} / {theirs}: {by_label[ours]['tokens_per_s'] / by_label[theirs]['tokens_per_s']:.2f}x tokens/s")
    return rows


if __name__ == "__main__":
    main()
