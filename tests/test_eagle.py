"""EAGLE / EAGLE-2: head training through Ray Train + DeepSpeed, the sweep's one-job-per-artefact rule,
lossless greedy decoding with a trained head, and exact tree sampling."""

from __future__ import annotations

import pytest
import torch
import yaml

from harness.core.errors import ConfigError
from tests.conftest import write_sweep

TINY_HEAD = {
    "kind": "eagle",
    "target": "zoo:target",
    "data": {"sources": ["zoo:code", "zoo:prose"], "samples": 96, "seq_len": 32, "shards": 2, "batch_size": 16},
    "steps": 40,
    "batch_size": 8,
    "lr": 0.003,
    "warmup_steps": 4,
    "launch": {"num_workers": 1, "cpus_per_worker": 1, "zero_stage": 1},
}


@pytest.fixture(scope="module")
def eagle_run(tmp_path_factory, tiny_zoo):
    """A sweep over eagle and eagle2 cells that need one untrained head: run it once for the module."""
    from harness.driver.config import load_sweep
    from harness.driver.scheduler import run_sweep

    directory = tmp_path_factory.mktemp("eagle")
    (directory / "head.yaml").write_text(yaml.safe_dump(TINY_HEAD))
    path = write_sweep(
        directory / "sweep.yaml",
        name="tiny-eagle",
        train={"head": "head.yaml"},
        strategies=[
            {"name": "eagle", "params": {"head": "head"}, "grid": {"gamma": [2, 4]}},
            {"name": "eagle2", "params": {"head": "head", "total_tokens": 8, "depth": 3, "top_k": 3}},
        ],
        run={"max_new_tokens": 16, "warmup_prompts": 1, "workers": 2, "num_cpus": 2},
    )
    sweep = load_sweep(path)
    outcome = run_sweep(sweep, directory / "run", log=lambda message: None)
    return sweep, outcome, directory


def head_request(sweep):
    cell = next(cell for cell in sweep.cells() if cell.artifacts)
    return cell.artifacts["head"]


def test_sweep_trains_the_missing_head_exactly_once_and_runs_every_cell(eagle_run):
    from harness.driver.scheduler import run_sweep

    sweep, outcome, directory = eagle_run
    assert len(outcome.trained) == 1
    assert outcome.failed == 0, outcome.failed_ids  # includes greedy equality with the baseline (float32)
    assert outcome.ok == outcome.total == 3  # interleaved pairing: no baseline cell
    assert head_request(sweep).built()
    again = run_sweep(sweep, directory / "second-run", log=lambda message: None)
    assert again.trained == [] and again.failed == 0


def test_training_lowers_the_loss(eagle_run):
    sweep, _, _ = eagle_run
    metrics = head_request(sweep).manifest()["metrics"]
    assert metrics["eval_after"]["loss"] < metrics["eval_before"]["loss"]
    assert metrics["train_loss_last"] < metrics["train_loss_first"]
    assert metrics["eval_after"]["top1"] > metrics["eval_before"]["top1"]


def test_saved_head_reloads_and_drafts_identically(eagle_run, zoo_models):
    import json

    from strategies.eagle_head import HEAD_CONFIG, HEAD_WEIGHTS, load_head

    sweep, _, _ = eagle_run
    directory = head_request(sweep).directory
    assert (directory / HEAD_WEIGHTS).exists()
    probe = json.loads((directory / HEAD_CONFIG).read_text())["probe"]
    models, _ = zoo_models
    target = models.target.model
    head = load_head(directory, target)
    ids = torch.tensor([probe["input_ids"]])
    with torch.no_grad():
        hidden = target(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        drafts = head(input_ids=ids[:, 1:], features=hidden[:, :-1]).logits[0].argmax(-1).tolist()
    assert drafts == probe["argmax"]


@pytest.fixture(scope="module")
def trained_models(eagle_run, zoo_models):
    from strategies import ModelSet
    from training.artifacts import load_artifact

    sweep, _, _ = eagle_run
    models, _ = zoo_models
    head = load_artifact(head_request(sweep), models.target)
    return ModelSet(target=models.target, drafts=models.drafts, artifacts={"head": head})


@pytest.mark.parametrize("name, params", [
    ("eagle", {"head": "head", "gamma": 1}),
    ("eagle", {"head": "head", "gamma": 4}),
    ("eagle2", {"head": "head", "total_tokens": 10, "depth": 4, "top_k": 3}),
    ("eagle2", {"head": "head", "total_tokens": 4, "depth": 1, "top_k": 5}),
    ("eagle2", {"head": "head", "total_tokens": 20, "depth": 6, "top_k": 2}),
])
def test_greedy_eagle_equals_autoregressive(trained_models, zoo_prompts, name, params):
    from strategies import Sampling, build

    baseline = build("autoregressive", {}, trained_models)
    strategy = build(name, params, trained_models)
    accepted = 0
    for prompt in zoo_prompts:
        expected = baseline.generate(prompt, 24, Sampling()).tokens
        trace = strategy.generate(prompt, 24, Sampling())
        assert trace.tokens == expected
        accepted += trace.accepted
    assert accepted > 0  # the multi-token path was exercised


@pytest.mark.parametrize("name, params", [("eagle", {"head": "head", "gamma": 4}),
                                          ("eagle2", {"head": "head", "total_tokens": 10, "depth": 4, "top_k": 3})])
def test_eagle_stops_at_the_limit_and_at_the_first_eos(trained_models, zoo_prompts, name, params):
    from strategies import Sampling, build
    from tests.conftest import check_stops_at_the_first_eos

    for limit in (1, 2, 7):
        trace = build(name, params, trained_models).generate(zoo_prompts[2], limit, Sampling())
        assert sum(step.accepted + 1 for step in trace.steps) == trace.new_tokens == limit
    check_stops_at_the_first_eos(trained_models, zoo_prompts, name, params)


def test_a_one_child_tree_drafts_exactly_the_chain(trained_models, zoo_prompts):
    from strategies import Sampling, build

    chain = build("eagle", {"head": "head", "gamma": 4}, trained_models)
    tree = build("eagle2", {"head": "head", "total_tokens": 5, "depth": 4, "top_k": 1}, trained_models)
    for prompt in zoo_prompts:
        expected = chain.generate(prompt, 24, Sampling())
        got = tree.generate(prompt, 24, Sampling())
        assert got.tokens == expected.tokens
        assert [(s.drafted, s.accepted) for s in got.steps] == [(s.drafted, s.accepted) for s in expected.steps]


BATCHED_HEADS = [("eagle", {"head": "head", "gamma": 4}),
                 ("eagle2", {"head": "head", "total_tokens": 10, "depth": 4, "top_k": 3})]


@pytest.mark.parametrize("name, params", BATCHED_HEADS)
def test_greedy_rows_at_batch_4_equal_the_batch_1_baseline(trained_models, zoo_prompts, name, params):
    """EAGLE's chain and EAGLE-2's tree at B = 4, prompts of different lengths: each row is the baseline's, in the
    steps it takes alone, and the head drafted something that was kept."""
    from strategies import Sampling, build
    from tests.test_batching import check_greedy_rows_equal_batch_1, ragged

    check_greedy_rows_equal_batch_1(trained_models, ragged(zoo_prompts), name, params)
    batch = build(name, params, trained_models).generate_batch(ragged(zoo_prompts), 30, Sampling())
    assert sum(step.accepted for row in batch.rows for step in row.steps) > 0
    assert batch.forward["head"]["prefill_calls"] == 1


@pytest.mark.parametrize("name, params", BATCHED_HEADS)
def test_batched_rows_stop_at_their_own_eos(trained_models, zoo_prompts, name, params):
    from tests.test_batching import check_rows_stop_at_their_own_eos, ragged

    check_rows_stop_at_their_own_eos(trained_models, ragged(zoo_prompts), name, params)


def test_tree_selection_keeps_ancestors_and_orders_parents_first():
    from strategies.methods.eagle import DraftTree

    tree = DraftTree([7], [-1], [0.0], [0])
    a = tree.add(1, 0, -0.1)
    b = tree.add(2, 0, -2.0)
    tree.add(3, a, -0.1)  # ties with its parent: the parent must still come first
    tree.add(4, a, -0.5)
    tree.add(5, b, -2.5)
    selected, kept = tree.select(3)
    assert kept == [0, 1, 3, 4]
    assert selected.parents == [-1, 0, 1, 1]
    assert selected.tokens == [7, 1, 3, 4]


def test_tree_sampling_reproduces_the_target_distribution():
    """Over many draws, the first token after the root follows p exactly, whatever the drafted children."""
    from strategies.methods.eagle import DraftTree
    from strategies.sampling import Sampling
    from strategies.verification import accept_tree

    vocab = 6
    p_root = torch.tensor([0.30, 0.05, 0.25, 0.10, 0.20, 0.10])
    tree = DraftTree([0], [-1], [0.0], [0])
    first = tree.add(3, 0, -0.2)   # a drafted child the target finds unlikely
    tree.add(2, 0, -0.9)
    tree.add(1, first, -0.5)
    p_rows = torch.stack([p_root, torch.full((vocab,), 1 / vocab), torch.full((vocab,), 1 / vocab),
                          torch.full((vocab,), 1 / vocab)])
    sampling = Sampling(temperature=1.0, generator=torch.Generator().manual_seed(0))
    draws = 20000
    counts = torch.zeros(vocab)
    for _ in range(draws):
        path, following = accept_tree(tree.tokens, tree.parents, tree.scores, p_rows, sampling)
        counts[tree.tokens[path[1]] if len(path) > 1 else following] += 1
    observed = counts / draws
    assert torch.allclose(observed, p_root, atol=0.015), observed


def test_sweep_rejects_a_head_not_in_the_train_section(tmp_path, tiny_zoo):
    from harness.driver.config import load_sweep

    path = write_sweep(tmp_path / "sweep.yaml", strategies=[{"name": "eagle", "params": {"head": "missing"}}])
    with pytest.raises(ConfigError, match=r"strategies\[0\]\.head: artefact 'missing' is not in the sweep's train"):
        load_sweep(path)


def test_training_config_errors_name_the_field(tmp_path, tiny_zoo):
    from harness.driver.config import load_sweep

    bad = {**TINY_HEAD, "stepz": 3}
    (tmp_path / "head.yaml").write_text(yaml.safe_dump(bad))
    path = write_sweep(tmp_path / "sweep.yaml", train={"head": "head.yaml"},
                       strategies=[{"name": "eagle", "params": {"head": "head"}}])
    with pytest.raises(ConfigError, match=r"train\.head\.stepz: unknown key"):
        load_sweep(path)
    (tmp_path / "head.yaml").write_text(yaml.safe_dump({**TINY_HEAD, "launch": {"zero_stage": 5}}))
    with pytest.raises(ConfigError, match=r"train\.head\.launch\.zero_stage"):
        load_sweep(path)


def test_cli_train_refuses_a_config_of_another_kind(tmp_path, capsys):
    from harness.driver.cli import main

    (tmp_path / "head.yaml").write_text(yaml.safe_dump(TINY_HEAD))
    assert main(["train", "adapter", str(tmp_path / "head.yaml")]) == 2
    assert "config.kind: the file trains 'eagle', not 'adapter'" in capsys.readouterr().err


def spadec_decode(models, prompt: list[int], limit: int, predictor=None):
    """SpaDec over the zoo target with every router executing: eagle2's proposer, the layer-skipping verifier."""
    from harness.core.dllm import SkippingLM
    from strategies import Sampling
    from strategies.engine import decode
    from strategies.methods.eagle import Eagle2Params, TreeHeadProposer
    from strategies.methods.spadec import SpaDecVerifier, default_split
    from tests.test_dllm import routers_for

    model = models.target.model
    target = SkippingLM(model, "dllm", routers_for(model), force_execute=True)
    proposer = TreeHeadProposer(models.artifact("head"), Eagle2Params(head="head", total_tokens=10, depth=4, top_k=3))
    verifier = SpaDecVerifier(default_split(model.config.num_hidden_layers), predictor=predictor)
    return decode(target, proposer, prompt, limit, Sampling(), verifier=verifier), verifier


def test_spadec_with_every_router_executing_and_the_predictor_off_equals_eagle2(trained_models, zoo_prompts):
    from strategies import Sampling, build

    eagle2 = build("eagle2", {"head": "head", "total_tokens": 10, "depth": 4, "top_k": 3}, trained_models)
    for prompt in zoo_prompts:
        expected = eagle2.generate(prompt, 24, Sampling())
        (tokens, steps), verifier = spadec_decode(trained_models, prompt, 24)
        assert tokens == expected.tokens
        assert [(s.drafted, s.accepted) for s in steps] == [(s.drafted, s.accepted) for s in expected.steps]
        assert verifier.log.deep_nodes == verifier.log.tree_nodes  # predictor off: the whole tree goes deep


def test_spadec_with_the_predictor_on_verifies_one_path_and_stays_exact_on_a_dense_target(trained_models,
                                                                                          zoo_prompts):
    from strategies import Sampling, build
    from strategies.spadec_selection import AcceptancePredictor

    torch.manual_seed(0)
    predictor = AcceptancePredictor(trained_models.target.model.config.hidden_size)
    baseline = build("autoregressive", {}, trained_models)
    for prompt in zoo_prompts[:3]:
        (tokens, _), verifier = spadec_decode(trained_models, prompt, 24, predictor=predictor)
        assert tokens == baseline.generate(prompt, 24, Sampling()).tokens
        assert verifier.log.deep_nodes < verifier.log.tree_nodes
        assert len(verifier.log.probabilities) == len(verifier.log.accepted) > 0


@pytest.mark.parametrize("name, params", [("eagle", {"head": "head", "gamma": 4}),
                                          ("eagle2", {"head": "head", "total_tokens": 10, "depth": 4, "top_k": 3})])
def test_eagle_on_the_static_path_decodes_what_it_decodes_on_the_dynamic_one(trained_models, zoo_prompts, name, params):
    from harness.core.static_lm import StaticCausalLM
    from strategies import ModelSet, Sampling, build

    target = StaticCausalLM(trained_models.target.model, "target", capacity=16, graphs=False)
    head = trained_models.artifact("head")
    static = ModelSet(target=target, artifacts={"head": StaticCausalLM(head.model, "eagle-head", capacity=16,
                                                                       graphs=False)})
    dynamic, compiled = build(name, params, trained_models), build(name, params, static)
    for prompt in zoo_prompts:
        expected = dynamic.generate(prompt, 24, Sampling())
        trace = compiled.generate(prompt, 24, Sampling())
        assert trace.tokens == expected.tokens
        assert [(s.drafted, s.accepted) for s in trace.steps] == [(s.drafted, s.accepted) for s in expected.steps]
