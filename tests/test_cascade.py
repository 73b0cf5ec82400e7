"""CS Drafting: lossless cascades, equivalence with speculative decoding, MaG, prompt lookup, k-matrix validation."""

from __future__ import annotations

import pytest

from harness.driver.cli import main
from strategies import Sampling, build
from strategies.ngram import BigramTable, find_continuation, mag_propose
from tests.conftest import write_sweep

K_MATRICES = [
    {"drafts": ["draft-2l", "draft-1l"], "k_matrix": [[3, 2], [0, 2]]},
    {"drafts": ["draft-2l", "draft-1l"], "k_matrix": [[1, 4], [0, 1]], "lenience": 3.0},
    {"drafts": ["draft-1l"], "k_matrix": [[3, 3], [0, 10]], "use_mag": True},
    {"drafts": ["draft-2l", "draft-1l"], "k_matrix": [[2, 2, 3], [0, 2, 1], [0, 0, 5]], "use_mag": True},
    {"drafts": ["draft-2l", "draft-1l"], "k_matrix": [[2, 2, 3], [0, 2, 1], [0, 0, 5]], "use_mag": True, "lenience": 2.0},
    {"drafts": [], "k_matrix": [[6]], "use_mag": True},
]


@pytest.fixture(scope="module")
def cascade_models(zoo_models, tiny_zoo):
    """The zoo models with the MaG bigram table built as the driver builds it: an artefact of kind bigram."""
    from dataclasses import replace

    from harness.core.paths import specsweep_home
    from strategies.methods.cascade import MAG_TABLE
    from training.artifacts import build_artifact, load_artifact, load_train_config

    models, tokenizer = zoo_models
    request = load_train_config({"kind": "bigram", "target": "zoo:target"}, "mag", specsweep_home(), tiny_zoo)
    build_artifact(request, log=lambda message: None)
    return replace(models, tokenizer=tokenizer, artifacts={**models.artifacts, MAG_TABLE: load_artifact(request, models.target)})


@pytest.mark.parametrize("params", K_MATRICES, ids=lambda p: f"{len(p['drafts'])}d-mag{p.get('use_mag', False)}"
                         f"-l{p.get('lenience', 1)}-{p['k_matrix'][0]}")
def test_greedy_cascade_equals_autoregressive(cascade_models, zoo_prompts, params):
    baseline = build("autoregressive", {}, cascade_models)
    strategy = build("cascade", params, cascade_models)
    for ids in zoo_prompts:
        expected = baseline.generate(ids, 40, Sampling())
        got = strategy.generate(ids, 40, Sampling())
        assert got.tokens == expected.tokens
        levels = got.extras["levels"]
        assert levels["target"]["reviews"] == len(got.steps)
        assert all(level["accepted"] <= level["proposed"] for level in levels.values())
        assert all(step.drafted <= sum(params["k_matrix"][0]) for step in got.steps)  # no level passes row 0


@pytest.mark.parametrize("gamma", [1, 3, 5])
def test_single_draft_cascade_is_speculative_decoding(cascade_models, zoo_prompts, gamma):
    cascade = build("cascade", {"drafts": ["draft-1l"], "k_matrix": [[gamma]]}, cascade_models)
    speculative = build("speculative", {"draft": "draft-1l", "gamma": gamma}, cascade_models)
    for ids in zoo_prompts:
        a, b = cascade.generate(ids, 33, Sampling()), speculative.generate(ids, 33, Sampling())
        assert a.tokens == b.tokens
        assert a.target_calls == b.target_calls
        assert [(s.drafted, s.accepted) for s in a.steps] == [(s.drafted, s.accepted) for s in b.steps]


@pytest.mark.parametrize("mag_tokens", [10, 4])
def test_mag_only_k_matrix_sets_the_draft_length(cascade_models, zoo_prompts, mag_tokens):
    """MaG proposes ``mag_tokens`` at a time, but the cascade stops at row 0's threshold (k = 5 used to draft 10)."""
    baseline = build("autoregressive", {}, cascade_models)
    expected = [baseline.generate(ids, 40, Sampling()).tokens for ids in zoo_prompts]
    drafted = {}
    for k in (5, 10):
        strategy = build("cascade", {"drafts": [], "k_matrix": [[k]], "use_mag": True, "mag_tokens": mag_tokens},
                         cascade_models)
        drafted[k] = 0
        for ids, tokens in zip(zoo_prompts, expected):
            got = strategy.generate(ids, 40, Sampling())
            assert got.tokens == tokens
            assert all(step.drafted <= k for step in got.steps)
            assert got.steps[0].drafted == k  # the first step has budget for k tokens (in several MaG calls if needed)
            drafted[k] += got.drafted
    assert drafted[10] > drafted[5]


def test_mag_costs_nothing_and_fixed_ratios_counter(cascade_models, zoo_prompts):
    mag_only = build("cascade", {"drafts": [], "k_matrix": [[5]], "use_mag": True}, cascade_models)
    trace = mag_only.generate(zoo_prompts[0], 20, Sampling())
    assert set(trace.forward) == {"target"}
    assert trace.cost_units == trace.target_calls * cascade_models.target.num_parameters
    ratios = build("cascade", {"drafts": ["draft-1l"], "k_matrix": [[2]], "counter": "fixed_ratios",
                               "cost_ratios": {"target": 1.0, "draft-1l": 0.25}}, cascade_models)
    trace = ratios.generate(zoo_prompts[0], 20, Sampling())
    assert trace.cost_units == trace.forward["target"]["calls"] + 0.25 * trace.forward["draft:draft-1l"]["calls"]


def test_suffix_matching():
    tokens = [5, 6, 7, 8, 1, 2, 5, 6, 7, 9, 4, 5, 6, 7]
    # longest suffix [5, 6, 7] first occurs at 0 and was followed by 8, 1, 2
    assert find_continuation(tokens, 3, max_ngram=4) == [8, 1, 2]
    assert find_continuation(tokens, 10, max_ngram=4)[:4] == [8, 1, 2, 5]
    assert find_continuation([1, 2, 3], 4, max_ngram=3) == []  # no earlier occurrence of any suffix
    assert find_continuation([3, 1, 2, 3], 2, max_ngram=3) == [1, 2]  # falls back to the 1-gram [3]
    assert find_continuation([1, 2, 9, 2], 2, max_ngram=3, min_ngram=2) == []


def test_mag_copies_then_fills_with_bigrams():
    table = BigramTable(next_token=(1, 2, 3, 0, 0, 0, 0, 0, 0, 0))
    assert mag_propose([7, 8, 9, 7, 8], 4, table, max_ngram=4) == [9, 7, 8] + [0]  # copy 9,7,8 then bigram of 8
    assert mag_propose([4, 5, 6], 3, table, max_ngram=4) == [0, 1, 2]  # no match: 6 -> 0 -> 1 -> 2


def test_bigram_counting():
    from training.bigram import count_bigrams

    table = count_bigrams([[0, 1, 0, 1, 0, 2], [3, 1]], vocab_size=5)
    assert table.next_token[0] == 1 and table.next_token[1] == 0 and table.next_token[3] == 1
    assert table.next_token[4] == 0  # never followed by anything: the most frequent token


def test_prompt_lookup_is_lossless(zoo_models, zoo_prompts):
    models, _ = zoo_models
    baseline = build("autoregressive", {}, models)
    strategy = build("prompt_lookup", {"num_tokens": 5, "max_ngram": 3}, models)
    drafted = 0
    for ids in zoo_prompts:
        got = strategy.generate(ids, 40, Sampling())
        assert got.tokens == baseline.generate(ids, 40, Sampling()).tokens
        drafted += got.drafted
    assert drafted > 0


BATCHED_K = [K_MATRICES[0], K_MATRICES[1], K_MATRICES[4], K_MATRICES[5]]


@pytest.mark.parametrize("params", BATCHED_K, ids=lambda p: f"{len(p['drafts'])}d-mag{p.get('use_mag', False)}"
                         f"-l{p.get('lenience', 1)}")
def test_cascade_rows_at_batch_4_equal_the_batch_1_baseline_with_each_rows_reviews(cascade_models, zoo_prompts,
                                                                                     params):
    from tests.test_batching import check_greedy_rows_equal_batch_1, ragged

    prompts = ragged(zoo_prompts)
    check_greedy_rows_equal_batch_1(cascade_models, prompts, "cascade", params)
    batch = build("cascade", params, cascade_models).generate_batch(prompts, 30, Sampling())
    single = build("cascade", params, cascade_models)
    for prompt, row in zip(prompts, batch.rows):  # every level reviewed each row as it reviews the row alone
        assert row.extras["levels"] == single.generate(prompt, 30, Sampling()).extras["levels"]


def test_batched_cascade_serves_rows_waiting_on_one_draft_in_one_forward(cascade_models, zoo_prompts):
    from tests.test_batching import ragged

    params = K_MATRICES[0]
    prompts = ragged(zoo_prompts)
    batch = build("cascade", params, cascade_models).generate_batch(prompts, 30, Sampling())
    single = build("cascade", params, cascade_models)
    alone = [single.generate(prompt, 30, Sampling()) for prompt in prompts]
    for role in ("draft:draft-2l", "draft:draft-1l"):
        calls = batch.forward[role]["decode_calls"]
        most_alone = max(trace.forward[role]["decode_calls"] for trace in alone)
        assert most_alone <= calls < sum(trace.forward[role]["decode_calls"] for trace in alone)


def test_cascade_rows_stop_at_their_own_eos(cascade_models, zoo_prompts):
    from tests.test_batching import check_rows_stop_at_their_own_eos, ragged

    check_rows_stop_at_their_own_eos(cascade_models, ragged(zoo_prompts), "cascade", K_MATRICES[3])


BAD_K = {
    "not square": ({"drafts": ["small"], "k_matrix": [[2, 1]]}, "k_matrix: must be square 1x1"),
    "size mismatch": ({"drafts": ["small"], "k_matrix": [[2, 1], [0, 1]]}, "k_matrix: must be square 1x1"),
    "mag needs a row": ({"drafts": ["small"], "use_mag": True, "k_matrix": [[2]]}, "k_matrix: must be square 2x2"),
    "negative": ({"drafts": ["small"], "use_mag": True, "k_matrix": [[2, -1], [0, 1]]}, "entry [0][1] is negative"),
    "below diagonal": ({"drafts": ["small"], "use_mag": True, "k_matrix": [[2, 1], [3, 1]]},
                       "entry [1][0] below the diagonal is 3"),
    "unknown draft": ({"drafts": ["huge"], "k_matrix": [[2]]}, "draft 'huge' is not in models.drafts"),
    "lenience": ({"drafts": ["small"], "k_matrix": [[2]], "lenience": 0.5}, "lenience: must be >= 1"),
}


@pytest.mark.parametrize("case", sorted(BAD_K))
def test_invalid_k_matrix_is_one_line_error(tmp_path, capsys, case):
    params, expected = BAD_K[case]
    path = write_sweep(tmp_path / "sweep.yaml", strategies=[{"name": "cascade", "params": params}])
    assert main(["run", str(path), "--results-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err and "strategies[0]." in err, err


def test_cascade_rejects_sampling(tmp_path, capsys):
    path = write_sweep(tmp_path / "sweep.yaml", run={"temperature": 0.7},
                       strategies=[{"name": "cascade", "params": {"drafts": ["small"], "k_matrix": [[2]]}}])
    assert main(["run", str(path), "--results-dir", str(tmp_path)]) == 2
    assert "cascade supports greedy decoding only" in capsys.readouterr().err


def test_the_mag_table_is_one_artefact_per_target_built_by_the_driver(tmp_path, tiny_zoo):
    from harness.driver.config import load_sweep
    from strategies.methods.cascade import MAG_TABLE

    path = write_sweep(tmp_path / "sweep.yaml", strategies=[
        {"name": "cascade", "params": {"drafts": ["small"], "use_mag": True},
         "grid": {"k_matrix": [[[2, 2], [0, 3]], [[1, 1], [0, 4]]]}},
        {"name": "cascade", "params": {"drafts": ["small"], "k_matrix": [[2]]}}])
    cells = [cell for cell in load_sweep(path).cells() if cell.kind == "strategy"]
    with_mag = [cell for cell in cells if cell.params.get("use_mag")]
    assert len(with_mag) == 2 and all(cell.artifacts[MAG_TABLE].kind == "bigram" for cell in with_mag)
    assert len({cell.artifacts[MAG_TABLE].key() for cell in with_mag}) == 1  # one table for the target
    assert all(MAG_TABLE not in cell.artifacts for cell in cells if not cell.params.get("use_mag"))
