"""Medusa-1: heads trained through the trainer skeleton, the published layout by round trip, the sparse tree
against brute force, lossless greedy decoding and exact sampling."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch

from strategies import Sampling, build
from strategies.medusa_heads import MedusaHeads, load_heads, save_heads
from strategies.methods.medusa import sparse_tree

TINY_MEDUSA = {
    "kind": "medusa",
    "target": "zoo:target",
    "data": {"sources": ["zoo:code", "zoo:prose"], "samples": 96, "seq_len": 32, "shards": 2, "batch_size": 16},
    "num_heads": 3,
    "steps": 60,
    "batch_size": 8,
    "lr": 0.003,
    "warmup_steps": 4,
    "launch": {"num_workers": 1, "cpus_per_worker": 1, "zero_stage": 1},
}


def random_heads(hidden: int = 16, vocab: int = 40, num_heads: int = 3, num_layers: int = 2, seed: int = 0
                 ) -> MedusaHeads:
    torch.manual_seed(seed)
    heads = MedusaHeads(hidden, vocab, num_heads, num_layers)
    with torch.no_grad():
        for parameter in heads.parameters():
            parameter.normal_(0, 0.2)  # non-zero blocks: a round trip that dropped one would show
    return heads.eval()


def test_saved_heads_use_the_published_keys_and_round_trip(tmp_path):
    heads = random_heads()
    save_heads(heads, tmp_path, base_model="zoo:target")
    state = heads.published_state()
    assert set(state) == {f"{k}.{j}.linear.{p}" for k in range(3) for j in range(2) for p in ("weight", "bias")} | \
        {f"{k}.2.weight" for k in range(3)}
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["medusa_num_heads"] == 3 and config["medusa_num_layers"] == 2
    hidden = torch.randn(5, 16)
    torch.testing.assert_close(load_heads(tmp_path)(hidden), heads(hidden))


def test_a_published_pt_checkpoint_loads(tmp_path):
    """Medusa publishes ``medusa_lm_head.pt`` (a state dict of its ``medusa_head`` module list) and a config."""
    heads = random_heads(num_layers=1, seed=3)
    torch.save({name: value.clone() for name, value in heads.published_state().items()}, tmp_path / "medusa_lm_head.pt")
    # the published Vicuna configs say 2 heads for the 5 their weights hold: the keys decide
    (tmp_path / "config.json").write_text(json.dumps({"medusa_num_heads": 2, "medusa_num_layers": 1,
                                                      "base_model_name_or_path": "lmsys/vicuna-7b-v1.3"}))
    hidden = torch.randn(4, 16)
    torch.testing.assert_close(load_heads(tmp_path)(hidden), heads(hidden))
    torch.save({name: value for name, value in heads.published_state().items() if name != "1.0.linear.bias"},
               tmp_path / "medusa_lm_head.pt")
    with pytest.raises(KeyError, match="lack"):
        load_heads(tmp_path)


@pytest.mark.parametrize("seed", range(5))
def test_the_sparse_tree_is_the_best_closed_set_of_paths(seed):
    """Greedy addition by expected acceptance picks the ``size`` paths of highest product of rank accuracies
    (each path's prefixes score at least as high, so the set is closed), checked by enumerating every path."""
    rng = random.Random(seed)
    heads, ranks, size = 3, 4, rng.randint(3, 12)
    accuracy = [sorted((rng.random() for _ in range(ranks)), reverse=True) for _ in range(heads)]
    chosen = sparse_tree(accuracy, size)
    everything = [path for depth in range(1, heads + 1) for path in itertools.product(range(ranks), repeat=depth)]

    def expected(path):
        value = 1.0
        for depth, rank in enumerate(path):
            value *= accuracy[depth][rank]
        return value

    best = sorted(everything, key=expected, reverse=True)[:size]
    assert sorted(expected(path) for path in chosen) == pytest.approx(sorted(expected(path) for path in best))
    assert all(path[:-1] in chosen for path in chosen if len(path) > 1)
    assert chosen == sorted(chosen, key=lambda path: (len(path), path))


@pytest.fixture(scope="module")
def trained_heads(tmp_path_factory, tiny_zoo, zoo_models):
    import yaml

    from harness.core.paths import specsweep_home
    from training.artifacts import build_artifact, load_artifact, load_train_config

    directory = tmp_path_factory.mktemp("medusa")
    (directory / "medusa.yaml").write_text(yaml.safe_dump(TINY_MEDUSA))
    request = load_train_config(TINY_MEDUSA, "medusa", specsweep_home(), tiny_zoo)
    build_artifact(request, log=lambda message: None)
    metrics = request.manifest()["metrics"]
    models, _ = zoo_models
    return load_artifact(request, models.target), metrics, request


def test_training_lowers_the_loss_and_measures_rank_accuracies(trained_heads):
    heads, metrics, request = trained_heads
    assert metrics["eval_after"]["loss"] < metrics["eval_before"]["loss"]
    assert heads.num_heads == 3 and len(heads.rank_accuracy) == 3
    assert all(0 <= sum(row) <= 1 for row in heads.rank_accuracy)
    assert heads.rank_accuracy[0][0] > 0  # the first head's best guess is right somewhere


@pytest.mark.parametrize("params", [{}, {"total_tokens": 6, "top_k": 2}, {"choices": [[0], [1], [0, 0], [0, 0, 0]]}],
                         ids=["default", "small", "choices"])
def test_greedy_medusa_equals_autoregressive(trained_heads, zoo_models, zoo_prompts, params):
    from dataclasses import replace

    heads, _, _ = trained_heads
    models, _ = zoo_models
    models = replace(models, artifacts={**models.artifacts, "medusa": heads})
    baseline = build("autoregressive", {}, models)
    strategy = build("medusa", {"heads": "medusa", **params}, models)
    accepted = 0
    for ids in zoo_prompts:
        got = strategy.generate(ids, 40, Sampling())
        assert got.tokens == baseline.generate(ids, 40, Sampling()).tokens
        accepted += got.accepted
        assert got.forward["heads"]["calls"] == sum(step.drafted > 0 for step in got.steps)  # once per draft
    assert accepted > 0


def test_sampling_keeps_the_target_distribution(tmp_path):
    from harness.core.lm import CausalLM
    from strategies import ModelSet
    from tests.test_speculative import check_sampling_keeps_the_joint_law, tiny_llama

    target_model = tiny_llama(1, 4)
    target = CausalLM(target_model, "target")
    heads = random_heads(hidden=int(target_model.config.hidden_size), vocab=4, num_heads=2, num_layers=1, seed=8)
    save_heads(heads, tmp_path)
    strategy = build("medusa", {"heads_dir": str(tmp_path), "total_tokens": 5, "top_k": 2}, ModelSet(target=target))
    check_sampling_keeps_the_joint_law(strategy, target, [0, 1, 3, 2, 1], runs=2000, seed=11)


BATCHED_TREES = [{}, {"choices": [[0], [1], [0, 0], [0, 0, 0]]}]


@pytest.mark.parametrize("params", BATCHED_TREES, ids=["default", "choices"])
def test_greedy_rows_at_batch_4_equal_the_batch_1_baseline(trained_heads, zoo_models, zoo_prompts, params):
    from dataclasses import replace

    from tests.test_batching import check_greedy_rows_equal_batch_1, ragged

    heads, _, _ = trained_heads
    models = replace(zoo_models[0], artifacts={**zoo_models[0].artifacts, "medusa": heads})
    check_greedy_rows_equal_batch_1(models, ragged(zoo_prompts), "medusa", {"heads": "medusa", **params})


def test_batched_rows_stop_at_their_own_eos_and_the_heads_read_all_rows_at_once(trained_heads, zoo_models,
                                                                                 zoo_prompts):
    from dataclasses import replace

    from tests.test_batching import check_rows_stop_at_their_own_eos, ragged

    heads, _, _ = trained_heads
    models = replace(zoo_models[0], artifacts={**zoo_models[0].artifacts, "medusa": heads})
    check_rows_stop_at_their_own_eos(models, ragged(zoo_prompts), "medusa", {"heads": "medusa"})
    batch = build("medusa", {"heads": "medusa"}, models).generate_batch(ragged(zoo_prompts), 30, Sampling())
    steps = max(len(row.steps) for row in batch.rows)
    assert batch.forward["heads"]["calls"] <= steps - 1 < sum(len(row.steps) - 1 for row in batch.rows)


def test_sampling_at_batch_4_keeps_each_rows_target_distribution(tmp_path):
    from harness.core.lm import CausalLM
    from strategies import ModelSet
    from tests.test_batching import SAMPLED_VOCAB, check_rows_sample_their_target_distribution
    from tests.test_speculative import tiny_llama

    target_model = tiny_llama(1, SAMPLED_VOCAB)
    heads = random_heads(hidden=int(target_model.config.hidden_size), vocab=SAMPLED_VOCAB, num_heads=2, num_layers=1,
                         seed=8)
    save_heads(heads, tmp_path)
    check_rows_sample_their_target_distribution(ModelSet(target=CausalLM(target_model, "target")), "medusa",
                                                {"heads_dir": str(tmp_path), "total_tokens": 5, "top_k": 2})


def test_bad_medusa_params_are_one_line_errors(tmp_path, capsys):
    from harness.driver.cli import main
    from tests.conftest import write_sweep

    path = write_sweep(tmp_path / "sweep.yaml", strategies=[{"name": "medusa", "params": {
        "heads_dir": str(tmp_path), "choices": [[0], [1, 0]]}}])
    assert main(["run", str(path), "--results-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "strategies[0].choices: path [1, 0]" in err, err


def test_chunked_evaluation_equals_one_pass():
    """The held-out statistics and rank accuracies, read a few windows at a time, equal one pass over them all."""
    from training.medusa import medusa_eval, medusa_loss

    generator = torch.Generator().manual_seed(0)
    heads = MedusaHeads(hidden=16, vocab=40, num_heads=3)
    rows = {"input_ids": torch.randint(0, 40, (7, 9), generator=generator),
            "hidden": torch.randn(7, 9, 16, generator=generator),
            "loss_mask": (torch.rand(7, 9, generator=generator) > 0.3).long()}
    with torch.no_grad():
        whole = medusa_loss(heads, rows, 0.8)[1]
    chunked = medusa_eval(heads, rows, 0.8, chunk=3)
    assert chunked.keys() == whole.keys()
    assert all(chunked[key] == pytest.approx(whole[key], rel=1e-5) for key in whole)
    one_pass = heads.measure_rank_accuracy(rows["hidden"], rows["input_ids"], rows["loss_mask"], ranks=5, chunk=7)
    by_twos = heads.measure_rank_accuracy(rows["hidden"], rows["input_ids"], rows["loss_mask"], ranks=5, chunk=2)
    assert torch.allclose(torch.tensor(by_twos), torch.tensor(one_pass))
    unmasked = heads.measure_rank_accuracy(rows["hidden"], rows["input_ids"], ranks=5)
    assert not torch.allclose(torch.tensor(unmasked), torch.tensor(one_pass))  # the mask decides what counts
