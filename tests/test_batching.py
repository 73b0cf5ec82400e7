"""Batched decoding (``run.batch_size`` > 1): each row lossless against the batch-1 baseline, the batched cache
exact under masking and compaction."""

from __future__ import annotations

import pytest
import torch

from harness.core.batched_lm import BatchedCausalLM
from strategies import Sampling, build
from strategies.batched_engine import BatchCapable

BATCHED = [("autoregressive", {}), ("speculative", {"draft": "draft-2l", "gamma": 4}),
           ("speculative", {"draft": "draft-1l", "gamma": 2}), ("prompt_lookup", {"num_tokens": 4, "max_ngram": 2})]


def ragged(prompts: list[list[int]]) -> list[list[int]]:
    """Four prompts of different lengths (cut from the fixtures' prompts)."""
    return [prompts[0][:9], prompts[1], prompts[2][:23], prompts[3][:5]]


def baseline_tokens(models, prompts: list[list[int]], limit: int = 30) -> list[list[int]]:
    """The batch-1 baseline's greedy tokens for each prompt."""
    baseline = build("autoregressive", {}, models)
    return [baseline.generate(prompt, limit, Sampling()).tokens for prompt in prompts]


@pytest.mark.parametrize("name,params", BATCHED)
def test_greedy_rows_at_batch_4_equal_the_batch_1_baseline(zoo_models, zoo_prompts, name, params):
    models, _ = zoo_models
    check_greedy_rows_equal_batch_1(models, ragged(zoo_prompts), name, params)


def check_greedy_rows_equal_batch_1(models, prompts: list[list[int]], name: str, params: dict) -> None:
    """Each row of a greedy batch equals the batch-1 baseline's tokens, in the steps it would take alone."""
    expected = baseline_tokens(models, prompts)
    batch = build(name, params, models).generate_batch(prompts, 30, Sampling())
    assert [row.tokens for row in batch.rows] == expected
    single = build(name, params, models)
    for prompt, row in zip(prompts, batch.rows):
        alone = single.generate(prompt, 30, Sampling())
        assert [(step.drafted, step.accepted) for step in row.steps] == \
            [(step.drafted, step.accepted) for step in alone.steps]


@pytest.mark.parametrize("name,params", BATCHED)
def test_rows_stop_at_their_own_eos_and_the_others_run_on(zoo_models, zoo_prompts, name, params):
    models, _ = zoo_models
    check_rows_stop_at_their_own_eos(models, ragged(zoo_prompts), name, params)


def check_rows_stop_at_their_own_eos(models, prompts: list[list[int]], name: str, params: dict) -> None:
    """With a token some rows emit standing in for EOS, each row stops at its own and the others run on."""
    expected = baseline_tokens(models, prompts)
    # a token some row emits for the first time at position >= 3 and another row never emits: it stands in for EOS
    stop = next(tokens[index] for tokens in expected for index in range(3, len(tokens))
                if tokens[index] not in tokens[:index] and any(tokens[index] not in other for other in expected))
    cut = [tokens[: tokens.index(stop) + 1] if stop in tokens else tokens for tokens in expected]
    target = models.target
    saved, target.eos_token_id = target.eos_token_id, frozenset({stop})
    try:
        batch = build(name, params, models).generate_batch(prompts, 30, Sampling())
    finally:
        target.eos_token_id = saved
    assert [row.tokens for row in batch.rows] == cut
    assert any(len(tokens) < 30 for tokens in cut) and any(len(tokens) == 30 for tokens in cut)
    for row in batch.rows:  # each row's steps end in the step that reached its end
        spans = [step.accepted + 1 for step in row.steps]
        assert sum(spans[:-1]) < row.new_tokens <= sum(spans)


def test_budgets_hold_per_row(zoo_models, zoo_prompts):
    models, _ = zoo_models
    for limit in (1, 2, 7):
        batch = build("speculative", {"draft": "draft-2l", "gamma": 4}, models).generate_batch(
            ragged(zoo_prompts), limit, Sampling())
        for row in batch.rows:
            assert sum(step.accepted + 1 for step in row.steps) == row.new_tokens == limit


def test_one_target_forward_per_batched_step(zoo_models, zoo_prompts):
    models, _ = zoo_models
    batch = build("speculative", {"draft": "draft-1l", "gamma": 3}, models).generate_batch(
        ragged(zoo_prompts), 20, Sampling())
    steps = max(len(row.steps) for row in batch.rows)
    # the prefill, then one pass per step, except a first step in which no row had anything to feed
    assert batch.forward["target"]["prefill_calls"] == 1
    assert steps - 1 <= batch.forward["target"]["decode_calls"] <= steps
    assert batch.forward["draft"]["prefill_calls"] == 1


def test_compaction_keeps_every_rows_logits(zoo_models, zoo_prompts):
    models, _ = zoo_models
    prompts = ragged(zoo_prompts)
    masked, compacted = (BatchedCausalLM.of(models.target, compact_after=10_000) for _ in range(2))
    for lm in (masked, compacted):
        lm.prefill(prompts)
        lm.extend([[5, 6, 7], [8], [], [9, 10]])
        lm.crop([len(prompts[0]) + 1, len(prompts[1]), len(prompts[2]), len(prompts[3]) + 2])
    compacted.compact(force=True)
    assert compacted.slots == max(compacted.lengths) < masked.slots
    assert compacted.lengths == masked.lengths
    rows = [[11, 12], [13], [14], []]
    got, want = compacted.extend(rows), masked.extend(rows)
    for row in range(3):
        torch.testing.assert_close(got.row(row), want.row(row), rtol=1e-5, atol=1e-5)


def test_a_masked_row_matches_the_same_row_alone(zoo_models, zoo_prompts):
    models, _ = zoo_models
    prompts = ragged(zoo_prompts)
    batch = BatchedCausalLM.of(models.target)
    batch.prefill(prompts)
    batch.extend([[5, 6, 7], [8, 9], [1], [2, 3, 4]])
    batch.crop([len(prompts[0]) + 1, len(prompts[1]) + 2, len(prompts[2]), len(prompts[3]) + 3])
    out = batch.extend([[20], [21], [22], [23]])
    for row, kept in enumerate([[5], [8, 9], [], [2, 3, 4]]):
        alone = BatchedCausalLM.of(models.target)
        alone.prefill([prompts[row] + kept])
        torch.testing.assert_close(out.row(row)[-1], alone.extend([[20 + row]]).row(0)[-1], rtol=1e-4, atol=1e-4)


def test_the_adaptive_schedule_at_batch_4_is_lossless_and_costs_are_measured_with_4_rows(zoo_models, zoo_prompts,
                                                                                          monkeypatch):
    from harness.core.batched_lm import BatchedCausalLM

    models, _ = zoo_models
    prompts = ragged(zoo_prompts)
    measured: list[int] = []  # the batch size of every timed calibration forward

    def injected(self, widths, batch_size, *args, **kwargs):
        """Timings injected instead of measured (a busy machine must not decide the schedule): a forward costs
        the square of the model's depth in ms, 5 % more per extra token."""
        measured.append(batch_size)
        return [1e-3 * self.model.config.num_hidden_layers ** 2 * (1 + 0.05 * (width - 1)) for width in widths]

    monkeypatch.setattr(BatchedCausalLM, "time_steps", injected)
    strategy = build("speculative", {"draft": "draft-2l", "gamma": 4, "schedule": "adaptive"}, models)
    strategy.prepare(prompts, 30)
    batch = strategy.generate_batch(prompts, 30, Sampling())
    assert [row.tokens for row in batch.rows] == baseline_tokens(models, prompts)
    assert measured and set(measured) == {4}
    summary = batch.rows[0].extras["draft_length"]
    assert summary["verify_costs_s"] == pytest.approx([0.016 * (1 + 0.05 * width) for width in range(5)])
    assert summary["draft_cost_s"] == pytest.approx(0.004) and summary["alpha_estimate"] is not None
    assert all(step.drafted <= 4 for row in batch.rows for step in row.steps)
    # one length per step for the whole batch: in a step where no row's budget binds, every row drafted as many
    committed = [0] * len(batch.rows)
    for index in range(min(len(row.steps) for row in batch.rows)):
        if all(30 - done - 1 >= 4 for done in committed):
            assert len({row.steps[index].drafted for row in batch.rows}) == 1
        committed = [done + row.steps[index].accepted + 1 for done, row in zip(committed, batch.rows)]


def test_strategies_that_cannot_batch_say_so():
    from strategies.registry import strategy_class

    assert issubclass(strategy_class("speculative"), BatchCapable)
    assert not issubclass(strategy_class("hf_assisted"), BatchCapable)


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> float:
    """Pearson's goodness-of-fit p-value of ``counts`` against ``probs``, cells expecting fewer than
    ``min_expected`` draws pooled into one."""
    expected = probs.double() * counts.sum()
    small = expected < min_expected
    observed = torch.cat([counts.double()[~small], counts.double()[small].sum()[None]])
    expected = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = expected > 0
    statistic = float((((observed - expected) ** 2)[keep] / expected[keep]).sum())
    freedom = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(freedom / 2), torch.tensor(statistic / 2)))


@pytest.mark.parametrize("name,params", [("speculative", {"draft": "d", "gamma": 2}),
                                         ("prompt_lookup", {"num_tokens": 2, "max_ngram": 2}),
                                         ("eagle", {"head": "head", "gamma": 2}),
                                         ("eagle2", {"head": "head", "total_tokens": 4, "depth": 2, "top_k": 2})])
def test_sampling_at_batch_4_keeps_each_rows_target_distribution(name, params):
    from harness.core.lm import CausalLM
    from strategies import ModelSet
    from strategies.eagle_head import EagleHead, head_config
    from tests.test_speculative import tiny_llama

    target_model = tiny_llama(1, SAMPLED_VOCAB)
    torch.manual_seed(3)  # an untrained head: its drafts are often rejected, so the residual draws are exercised
    head = EagleHead(head_config(target_model.config), target_model.get_input_embeddings(),
                     target_model.get_output_embeddings()).eval()
    models = ModelSet(target=CausalLM(target_model, "target"),
                      drafts={"d": CausalLM(tiny_llama(2, SAMPLED_VOCAB), "draft")},
                      artifacts={"head": CausalLM(head, "eagle-head")})
    check_rows_sample_their_target_distribution(models, name, params)


SAMPLED_VOCAB = 4  # the sampling checks' vocabulary: 4 ** 3 joint outcomes of 3 tokens


def check_rows_sample_their_target_distribution(models, name: str, params: dict, draws: int = 300) -> None:
    """Rows of two different prompts (one padded under the other) each sample the target's joint law of their
    first three tokens, through the batched caches, masking and acceptance (Pearson's test, p > 0.001); the test
    tells a row that read the other row's prompt. ``models.target`` has ``SAMPLED_VOCAB`` tokens."""
    from tests.test_speculative import exact_joint, total_variation

    length = 3
    prompts = [[1, 3, 2], [2, 1, 3, 1, 3], [1, 3, 2], [2, 1, 3, 1, 3]]
    truths = [exact_joint(models.target, prompt, SAMPLED_VOCAB, length).flatten() for prompt in prompts[:2]]
    strategy = build(name, params, models)
    generator = torch.Generator().manual_seed(99)
    counts = [torch.zeros((SAMPLED_VOCAB,) * length) for _ in range(2)]
    for _ in range(draws):
        batch = strategy.generate_batch(prompts, length, Sampling(temperature=1.0, generator=generator))
        for row, trace in enumerate(batch.rows):
            counts[row % 2][tuple(trace.tokens)] += 1
    for count, truth in zip(counts, truths):
        assert chi_square_p_value(count.flatten(), truth) > 1e-3
        assert chi_square_p_value(count.flatten(), truths[1] if truth is truths[0] else truths[0]) < 1e-6
    assert total_variation(truths[0], truths[1]) > 0.2


def test_a_grid_sweeps_batch_size_and_batch_1_keeps_its_cell_id(tmp_path):
    from harness.driver.config import load_sweep
    from tests.conftest import write_sweep

    plain = load_sweep(write_sweep(tmp_path / "plain.yaml")).cells()
    strategies = [{"name": "speculative", "params": {"draft": "small"}, "grid": {"gamma": [2, 3], "batch_size": [1, 4]}}]
    swept = load_sweep(write_sweep(tmp_path / "swept.yaml", strategies=strategies,
                                   run={"max_new_tokens": 12, "pairing": "interleaved"})).cells()
    by_batch = {size: [cell for cell in swept if cell.run.batch_size == size] for size in (1, 4)}
    assert len(by_batch[1]) == len(by_batch[4]) == 2
    assert all("batch_size" not in cell.params for cell in swept)
    assert all(cell.label.endswith("at batch 4") for cell in by_batch[4])
    interleaved_plain = load_sweep(write_sweep(tmp_path / "p2.yaml", run={"max_new_tokens": 12,
                                                                          "pairing": "interleaved"})).cells()
    assert {cell.cell_id for cell in by_batch[1]} == {cell.cell_id for cell in interleaved_plain}
    assert not {cell.cell_id for cell in by_batch[4]} & {cell.cell_id for cell in plain + interleaved_plain}


def test_a_batched_cell_pairs_each_row_with_the_batched_baseline_and_the_report_reads_it_by_batch_size(
        tiny_zoo, tmp_path):
    from harness.core.metrics import summarize
    from harness.core.results import ResultStore
    from harness.driver.compare import leaderboard
    from harness.driver.config import load_sweep
    from harness.driver.model_cache import ModelCache
    from harness.driver.report import write_report
    from harness.driver.runner import run_cell
    from tests.conftest import write_sweep

    sweep_path = write_sweep(tmp_path / "sweep.yaml", prompts=[{"name": "code", "source": "zoo:code", "count": 5}],
                             strategies=[{"name": "speculative", "params": {"draft": "small", "gamma": 2},
                                          "grid": {"batch_size": [1, 3]}},
                                         {"name": "oracle", "params": {"gamma": 3, "acceptance": 0.7}}],
                             run={"max_new_tokens": 12, "warmup_prompts": 1, "workers": 1, "num_cpus": 1,
                                  "pairing": "interleaved"})
    single, batched, oracle = load_sweep(sweep_path).cells()
    cache = ModelCache(tiny_zoo, "cpu")
    store = ResultStore(tmp_path / "run")
    for cell in (single, batched, oracle):
        store.append(run_cell(cell, cache))
    record = store.latest()[batched.cell_id]
    assert record.ok, record.error
    turns = [turn for prompt in record.prompts for turn in prompt.turns]
    assert len(record.prompts) == 5 and all(turn.tokens_match for turn in turns)
    sizes = [turn.strategy.extras["batch"]["size"] for turn in turns]
    assert sizes == [3, 3, 3, 2, 2]  # five prompts in batches of three and two
    for side in ("baseline", "strategy"):
        rows = [getattr(turn, side) for turn in turns]
        for first, size in ((0, 3), (3, 2)):  # each row holds an equal share of its batch's wall time
            batch = rows[first:first + size]
            assert sum(row.wall_s for row in batch) == pytest.approx(batch[0].extras["batch"]["wall_s"])
            assert all(0 < row.extras["batch"]["first_token_s"] <= row.extras["batch"]["finished_s"] for row in batch)
    walls = {side: sum(getattr(turn, side).extras["batch"]["wall_s"] / getattr(turn, side).extras["batch"]["size"]
                       for turn in turns) for side in ("baseline", "strategy")}
    summary = summarize(record.prompts)
    # greedy: both sides wrote the same tokens, so the cell's speedup is the ratio of the batches' wall times
    assert summary["speedup"] == pytest.approx(walls["baseline"] / walls["strategy"], rel=1e-9)
    assert summary["strategy_ttft_ms_p50"] <= summary["strategy_ttft_ms_p99"]
    assert "strategy_ttft_ms_p50" not in summarize(store.latest()[single.cell_id].prompts)  # batch 1: none recorded

    (tmp_path / "run" / "sweep.yaml").write_text(sweep_path.read_text())
    report = write_report(tmp_path / "run").read_text()
    section = report.split("## Batch size", 1)[1].split("\n## ", 1)[0]
    assert "| speculative | draft=\"small\", gamma=2 | code | " in section and "B=1" in section and "B=3" in section
    assert (tmp_path / "run" / "speedup_vs_batch.png").exists()
    assert "| oracle |" not in report.split("## Synthetic acceptance (oracle)", 1)[0]  # not a method: no rank
    assert "| code | 1 | 3 | 0.70 |" in report.split("## Synthetic acceptance (oracle)", 1)[1]
    table = leaderboard([tmp_path / "run"], by="batch")
    assert list(table["method"]) == ['speculative draft="small", gamma=2'] and {"B=1", "B=3"} <= set(table.columns)


def test_the_crossover_is_where_the_interval_stays_below_one():
    import pandas as pd

    from harness.driver.batch_report import crossover

    def frame(highs: list[float]) -> pd.DataFrame:
        return pd.DataFrame({"batch_size": [1, 2, 4, 8][:len(highs)], "speedup_high": highs})

    assert crossover(frame([1.5, 0.9, 1.1, 0.8])) == "8"  # a dip below 1 that recovers is no crossover
    assert crossover(frame([1.5, 1.2, 0.95, 0.7])) == "4"
    assert crossover(frame([1.5, 1.2, 1.05])) == "none up to 4"
