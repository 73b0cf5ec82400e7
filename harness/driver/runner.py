"""Running one cell in-process: the autoregressive baseline and the strategy on the same prompts, paired.

Under ``run.pairing: interleaved`` (the default) each turn of each prompt runs
the baseline and the strategy back to back on the same worker, alternating
which goes first, so that a machine slowing down or speeding up hits both
sides. Under ``pairing: shared`` a baseline cell runs once per prompt shard
and every strategy cell on it replays its conversations; a strategy cell on a
device of another name runs its baseline itself. Each side is timed
``run.repeats`` times per turn (the median is kept), and after each run the
target's 1-token forward is timed on a fixed short context: the drift guard
(``harness.core.metrics.timing_check``) compares those probes between the sides.
Greedy cells also check that the strategy's tokens equal the baseline's; in
float32 a mismatch fails the cell, and in another dtype each mismatch is
classified as a numerical tie or a real divergence (``harness.core.divergence``),
and a real one fails the cell.
"""

from __future__ import annotations

import platform
import time
import traceback
from dataclasses import replace

import torch

from harness.core.divergence import classify
from harness.core.metrics import timing_check
from harness.core.paths import content_hash
from harness.core.prompts import Prompt, conversation_ids, load_prompts, shard, template_label
from harness.core.records import CellRecord, Environment, PromptRecord, SideRecord, TurnRecord, paired_turn
from harness.driver.config import Cell
from harness.driver.model_cache import ModelCache
from harness.driver.provenance import cpu_model
from strategies import ModelSet, Sampling, Trace, build, strategy_class
from strategies.batched_engine import BatchTrace
from strategies.timing import timed_generate, timed_generate_batch


class CellFailure(RuntimeError):
    """A cell ran but its result is invalid (e.g. a lossless strategy changed the greedy output)."""


def model_set_for(cell: Cell, cache: ModelCache) -> ModelSet:
    """Load (or reuse) the cell's target and the drafts its params name."""
    target = cache.model(cell.target_spec, "target")
    drafts = {name: cache.model(spec, f"draft:{name}") for name, spec in cell.drafts.items()}
    shared_vocabulary = not strategy_class(cell.strategy).supports_other_tokenizers
    for name, draft in drafts.items():
        if shared_vocabulary and draft.vocab_size != target.vocab_size:
            raise CellFailure(f"draft {name!r} has vocabulary {draft.vocab_size}, target {target.vocab_size}: "
                              "a draft must share the target's tokenizer")
    artifacts = {name: cache.artifact(request, cell.target_spec) for name, request in cell.artifacts.items()}
    draft_tokenizers = {name: cache.tokenizer(spec) for name, spec in cell.drafts.items()}
    return ModelSet(target=target, drafts=drafts, tokenizer=cache.tokenizer(cell.target_spec), artifacts=artifacts,
                    draft_tokenizers=draft_tokenizers)


def conversation_at(prompt: Prompt, turn_index: int, answers: list[str]) -> list[str]:
    """User turns up to ``turn_index`` interleaved with the earlier turns' ``answers``."""
    conversation = []
    for index, turn in enumerate(prompt.turns[: turn_index + 1]):
        conversation.append(turn)
        if index < turn_index:
            conversation.append(answers[index])
    return conversation


def run_baseline_prompt(baseline, prompt: Prompt, tokenizer, cell: Cell, limit: int, device: torch.device,
                        models: ModelSet) -> PromptRecord:
    """Run every turn of ``prompt`` with the baseline (Spec-Bench style: each turn sees the earlier answers)."""
    record = PromptRecord(prompt.prompt_id, prompt.category)
    answers: list[str] = []
    for turn_index in range(len(prompt.turns)):
        ids = conversation_ids(tokenizer, cell.prompt_set, conversation_at(prompt, turn_index, answers), limit)
        trace = median_run([timed(baseline, ids, cell, turn_seed(cell, prompt, turn_index), device, models)
                            for _ in range(cell.run.repeats)])
        answers.append(tokenizer.decode(trace.tokens, skip_special_tokens=True))
        record.turns.append(TurnRecord(prompt_ids=ids, prompt_tokens=len(ids), baseline=SideRecord.of(trace),
                                       answer=answers[-1]))
    return record


def run_strategy_prompt(strategy, prompt: Prompt, baseline_prompt: PromptRecord, tokenizer, cell: Cell, limit: int,
                        device: torch.device, models: ModelSet) -> PromptRecord:
    """Run ``prompt`` turn by turn with the strategy on the baseline's conversation, paired with its traces."""
    record = PromptRecord(prompt.prompt_id, prompt.category)
    answers = [turn.answer or "" for turn in baseline_prompt.turns]
    for turn_index, base_turn in enumerate(baseline_prompt.turns):
        ids = conversation_ids(tokenizer, cell.prompt_set, conversation_at(prompt, turn_index, answers), limit)
        trace = median_run([timed(strategy, ids, cell, turn_seed(cell, prompt, turn_index), device, models,
                                  prompt.category) for _ in range(cell.run.repeats)])
        record.turns.append(paired_turn(ids, base_turn.baseline, trace))
    return record


def run_interleaved_prompt(baseline, strategy, prompt: Prompt, tokenizer, cell: Cell, limit: int,
                           device: torch.device, models: ModelSet, order: int) -> PromptRecord:
    """Run each turn of ``prompt`` with the baseline and the strategy back to back, alternating which goes first
    (``order`` counts the turns run before, so the alternation continues across prompts)."""
    record = PromptRecord(prompt.prompt_id, prompt.category)
    answers: list[str] = []
    for turn_index in range(len(prompt.turns)):
        ids = conversation_ids(tokenizer, cell.prompt_set, conversation_at(prompt, turn_index, answers), limit)
        seed = turn_seed(cell, prompt, turn_index)
        runs: dict[str, list[Trace]] = {"baseline": [], "strategy": []}
        for repeat in range(cell.run.repeats):
            sides = ("baseline", "strategy") if (order + turn_index + repeat) % 2 == 0 else ("strategy", "baseline")
            for side in sides:
                runner, category = (baseline, None) if side == "baseline" else (strategy, prompt.category)
                runs[side].append(timed(runner, ids, cell, seed, device, models, category))
        base, trace = median_run(runs["baseline"]), median_run(runs["strategy"])
        answers.append(tokenizer.decode(base.tokens, skip_special_tokens=True))
        record.turns.append(paired_turn(ids, SideRecord.of(base), trace,
                                        first=sides[0] if cell.run.repeats == 1 else "alternating"))
    return record


def run_interleaved_batch(baseline, strategy, prompts: list[Prompt], tokenizer, cell: Cell, limit: int,
                          device: torch.device, models: ModelSet, order: int) -> list[PromptRecord]:
    """``run_interleaved_prompt`` for a batch: turn k of every prompt in ``prompts`` is decoded as one batch by the
    baseline and one by the strategy, back to back, alternating which goes first; a prompt with fewer turns leaves
    the later batches. Each row's record holds an equal share of its batch's time (``BatchTrace.per_row``)."""
    records = [PromptRecord(prompt.prompt_id, prompt.category) for prompt in prompts]
    answers: list[list[str]] = [[] for _ in prompts]
    for turn_index in range(max(len(prompt.turns) for prompt in prompts)):
        rows = [index for index, prompt in enumerate(prompts) if turn_index < len(prompt.turns)]
        ids = [conversation_ids(tokenizer, cell.prompt_set, conversation_at(prompts[index], turn_index, answers[index]),
                                limit) for index in rows]
        seed = int(content_hash([cell.run.seed, [prompts[index].prompt_id for index in rows], turn_index])[:8], 16)
        runs: dict[str, list[BatchTrace]] = {"baseline": [], "strategy": []}
        for repeat in range(cell.run.repeats):
            sides = ("baseline", "strategy") if (order + turn_index + repeat) % 2 == 0 else ("strategy", "baseline")
            for side in sides:
                runs[side].append(timed_batch(baseline if side == "baseline" else strategy, ids, cell, seed, device,
                                              models))
        base = median_run(runs["baseline"]).per_row(baseline.cost_units)
        batch = median_run(runs["strategy"]).per_row(strategy.cost_units)
        for position, index in enumerate(rows):
            answers[index].append(tokenizer.decode(base[position].tokens, skip_special_tokens=True))
            records[index].turns.append(paired_turn(ids[position], SideRecord.of(base[position]), batch[position],
                                                    first=sides[0] if cell.run.repeats == 1 else "alternating"))
    return records


def median_run(traces: list[Trace]) -> Trace:
    """The run of median wall time among repeats of one turn (the lower median for an even count)."""
    ordered = sorted(traces, key=lambda trace: trace.wall_s)
    chosen = ordered[(len(ordered) - 1) // 2]
    if len(traces) > 1:
        chosen.extras = {**chosen.extras, "wall_runs": [trace.wall_s for trace in traces],
                         "probe_runs": [trace.extras.get("probe_s") for trace in traces]}
    return chosen


def turn_seed(cell: Cell, prompt: Prompt, turn_index: int) -> int:
    """The sampling seed of one turn: the same for the baseline and every strategy."""
    return int(content_hash([cell.run.seed, prompt.prompt_id, turn_index])[:8], 16)


def timed_batch(strategy, rows: list[list[int]], cell: Cell, seed: int, device: torch.device,
                models: ModelSet) -> BatchTrace:
    """``timed`` for a batch of prompts (``strategies.timing.timed_generate_batch``)."""
    strategy.prompt_category = None
    generator = torch.Generator(device=device).manual_seed(seed)
    sampling = Sampling(temperature=cell.run.temperature, generator=generator)
    return timed_generate_batch(strategy, rows, cell.run.max_new_tokens, sampling, device, probe=models.target,
                                clock=models.target.clock)


def timed(strategy, ids: list[int], cell: Cell, seed: int, device: torch.device, models: ModelSet,
          category: str | None = None) -> Trace:
    """``strategy.generate`` with synchronised wall-clock time and a seeded generator, then the target's
    1-token probe (untimed in the wall time)."""
    strategy.prompt_category = category
    generator = torch.Generator(device=device).manual_seed(seed)
    sampling = Sampling(temperature=cell.run.temperature, generator=generator)
    return timed_generate(strategy, ids, cell.run.max_new_tokens, sampling, device, probe=models.target,
                          clock=models.target.clock)


def run_cell(cell: Cell, cache: ModelCache, worker: str = "local", baseline: CellRecord | None = None) -> CellRecord:
    """Run ``cell`` and return its record (status ``ok`` or ``failed`` with the error and traceback).

    Under shared pairing a strategy cell needs its ``baseline`` cell's record: it
    replays the same conversations and stores the baseline's traces beside its own.
    """
    started = time.time()
    record = CellRecord(cell_id=cell.cell_id, kind=cell.kind, label=cell.label, cell=cell.identity(), worker=worker,
                        started=started)
    try:
        models = model_set_for(cell, cache)
        tokenizer = cache.tokenizer(cell.target_spec)
        prompts = shard(load_prompts(cell.prompt_set, cache.zoo_config.corpus), cell.shard, cell.prompt_set.shards)
        if not prompts:
            raise CellFailure(f"prompt set {cell.prompt_set.name!r} shard {cell.shard} has no prompts")
        limit = prompt_limit(cell, models)
        record.env = environment(cache, models, cell)
        record.template = template_label(tokenizer, cell.prompt_set)
        warmup = prompts[: cell.run.warmup_prompts]
        device = cache.device
        autoregressive = build("autoregressive", {}, models)
        if cell.kind == "baseline":
            for prompt in warmup:
                run_baseline_prompt(autoregressive, prompt, tokenizer, cell, limit, device, models)
            record.prompts = [run_baseline_prompt(autoregressive, p, tokenizer, cell, limit, device, models)
                              for p in prompts]
        else:
            strategy = build(cell.strategy, cell.params, models)
            if cell.run.pairing == "interleaved" and cell.run.batch_size > 1:
                size = cell.run.batch_size
                record.paired_with = {"pairing": "interleaved", "batch_size": size}
                for start in range(0, len(warmup), size):
                    run_interleaved_batch(autoregressive, strategy, warmup[start:start + size], tokenizer, cell, limit,
                                          device, models, 0)
                for start in range(0, len(prompts), size):
                    order = sum(len(p.turns) for p in record.prompts)
                    record.prompts.extend(run_interleaved_batch(autoregressive, strategy, prompts[start:start + size],
                                                                tokenizer, cell, limit, device, models, order))
            elif cell.run.pairing == "interleaved":
                record.paired_with = {"pairing": "interleaved"}
                for prompt in warmup:
                    run_interleaved_prompt(autoregressive, strategy, prompt, tokenizer, cell, limit, device, models, 0)
                for prompt in prompts:
                    order = sum(len(p.turns) for p in record.prompts)
                    record.prompts.append(run_interleaved_prompt(autoregressive, strategy, prompt, tokenizer, cell,
                                                                 limit, device, models, order))
            else:
                if baseline is None or not baseline.ok:
                    raise CellFailure(f"baseline cell {cell.baseline_id} has no successful result")
                own_device = record.env.device_name
                record.paired_with = {"pairing": "shared", "cell_id": baseline.cell_id, "worker": baseline.worker,
                                      "device": baseline.device_name}
                baseline_prompts = baseline.prompts
                if baseline.device_name != own_device:  # never pair across device models: run the baseline here
                    record.paired_with = {"pairing": "shared", "inline": True, "device": own_device,
                                          "reason": f"the baseline cell ran on {baseline.device_name}"}
                    for prompt in warmup:
                        run_baseline_prompt(autoregressive, prompt, tokenizer, cell, limit, device, models)
                    baseline_prompts = [run_baseline_prompt(autoregressive, p, tokenizer, cell, limit, device, models)
                                        for p in prompts]
                by_id = {p.prompt_id: p for p in baseline_prompts}
                for prompt in warmup:
                    run_strategy_prompt(strategy, prompt, by_id[prompt.prompt_id], tokenizer, cell, limit, device,
                                        models)
                record.prompts = [run_strategy_prompt(strategy, p, by_id[p.prompt_id], tokenizer, cell, limit,
                                                      device, models) for p in prompts]
            check_lossless(cell, record, models, cache)
            record.timing = {**timing_check(record.prompts, cell.run.drift_tolerance, cell.run.max_cpu_wait),
                             "tolerance": cell.run.drift_tolerance, "max_cpu_wait": cell.run.max_cpu_wait}
        record.status = "ok"
    except Exception as error:  # a failing strategy must not stop the sweep
        record.status = "failed"
        record.error = f"{type(error).__name__}: {error}"
        record.traceback = traceback.format_exc()
    record.seconds = time.time() - started
    return record


def prompt_limit(cell: Cell, models: ModelSet) -> int:
    """Longest prompt (in tokens) that leaves room for generation within every model's context."""
    contexts = [getattr(m.model.config, "max_position_embeddings", 1 << 30) for m in (models.target, *models.drafts.values())]
    limit = min(contexts) - cell.run.max_new_tokens - 8
    if cell.run.max_prompt_tokens:
        limit = min(limit, cell.run.max_prompt_tokens)
    if limit < 1:
        raise CellFailure(f"max_new_tokens {cell.run.max_new_tokens} leaves no room for a prompt in a "
                          f"{min(contexts)}-token context")
    return limit


def check_lossless(cell: Cell, record: CellRecord, models: ModelSet, cache: ModelCache) -> None:
    """Fail a greedy cell of a lossless strategy whose tokens differ from the baseline's: in float32 on any
    difference; in another dtype on a real divergence, after classifying each divergent turn as a numerical
    tie or a real divergence (``harness.core.divergence``; the classification is kept in the turn's record)."""
    if cell.run.sampled or strategy_class(cell.strategy).lossy:
        return
    diverged = [(prompt, index, turn) for prompt in record.prompts for index, turn in enumerate(prompt.turns)
                if not turn.tokens_match]
    if not diverged:
        return
    if cell.target_spec.dtype == "float32":
        prompt, index, turn = diverged[0]
        raise CellFailure(f"greedy output differs from the baseline on prompt {prompt.prompt_id} "
                          f"turn {index} at token {turn.first_divergence}")
    reference = cache.model(replace(cell.target_spec, dtype="float32"), "target:float32").model
    eos = min(models.target.eos_token_id) if models.target.eos_token_id else 0
    for prompt, index, turn in diverged:
        turn.divergence = classify(reference, models.target.model, turn.prompt_ids, turn.baseline.tokens,
                                   turn.strategy.tokens, turn.first_divergence, eos)
    real = [(prompt, index, turn) for prompt, index, turn in diverged if not turn.divergence.is_tie]
    if real:
        prompt, index, turn = real[0]
        found = turn.divergence
        raise CellFailure(f"{len(real)} of {len(diverged)} divergent turns are real divergences, not "
                          f"{cell.target_spec.dtype} ties: first on prompt {prompt.prompt_id} turn {index} at token "
                          f"{found.position}, where the float32 target scores the strategy's token {found.gap:.3f} "
                          f"away from the baseline's, beyond the rounding bound {found.bound:.3f}")


def environment(cache: ModelCache, models: ModelSet, cell: Cell) -> Environment:
    """Device, dtype, library versions, host and seed for the record."""
    import transformers

    device = cache.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    return Environment(device=str(device), device_name=name, dtype=cell.target_spec.dtype, torch=torch.__version__,
                       transformers=transformers.__version__, python=platform.python_version(), host=platform.node(),
                       threads=torch.get_num_threads(), seed=cell.run.seed,
                       parameters={role: model.num_parameters for role, model in models.all().items()})
