"""SpaDec's pieces: the depth weights, acceptance-guided path selection by dynamic programming on hand-made trees,
the acceptance predictor's training, and the AUC that reports it."""

from __future__ import annotations

import math

import pytest
import torch

from harness.core.metrics import roc_auc
from strategies.spadec_selection import AcceptancePredictor, depth_weight, prune_below_mean, select_path


def test_depth_weights_grow_logarithmically_then_fade_by_sech():
    assert depth_weight(0) == 0.0
    assert depth_weight(1) == pytest.approx(math.log(2)) and depth_weight(2) == pytest.approx(math.log(3))
    assert depth_weight(3) == pytest.approx(1.0) and depth_weight(5) == pytest.approx(1 / math.cosh(2))


def test_nodes_below_the_mean_are_pruned_with_their_subtrees():
    #        0
    #      /   \
    #     1     2          p: 1 .9, 2 .5, 3 .2, 4 .8, 5 .95, 6 .9 (mean .708)
    #    / \    |
    #   3   4   5 - 6
    parents = [-1, 0, 0, 1, 1, 2, 5]
    probabilities = [1.0, 0.9, 0.5, 0.2, 0.8, 0.95, 0.9]
    assert prune_below_mean(parents, probabilities) == [True, True, False, False, True, False, False]
    assert select_path(parents, probabilities) == [0, 1, 4]  # 5 and 6 are likely, but their parent was pruned


def test_the_path_maximises_the_weighted_sum_not_the_first_step():
    # root children A .9, B .85 and three unlikely ones; A -> C .86; B -> D .95 -> E .95
    parents = [-1, 0, 0, 0, 0, 0, 1, 2, 7]
    probabilities = [1.0, 0.9, 0.85, 0.1, 0.1, 0.1, 0.86, 0.95, 0.95]
    a_c = 0.9 * math.log(2) + 0.86 * math.log(3)
    b_d_e = 0.85 * math.log(2) + 0.95 * math.log(3) + 0.95 * depth_weight(3)
    assert b_d_e > a_c
    assert select_path(parents, probabilities) == [0, 2, 7, 8]  # greedy on the first step would take A


def test_a_lone_root_selects_itself():
    assert select_path([-1], [1.0]) == [0]


def test_predictor_training_lowers_its_loss_on_a_fixed_batch():
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(64, 16, generator=generator)
    accepted = (hidden[:, 0] + 0.5 * hidden[:, 1] > 0).float()  # a separable rule
    torch.manual_seed(0)
    predictor = AcceptancePredictor(16)
    optimiser = torch.optim.Adam(predictor.parameters(), lr=0.05)
    before = float(predictor.loss(hidden, accepted).detach())
    for _ in range(50):
        optimiser.zero_grad()
        predictor.loss(hidden, accepted).backward()
        optimiser.step()
    after = float(predictor.loss(hidden, accepted).detach())
    assert after < 0.5 * before
    probabilities = predictor(hidden).detach()
    assert probabilities.shape == (64,) and roc_auc(accepted.int().tolist(), probabilities.tolist()) > 0.95


def test_auc_counts_ordered_pairs_and_half_of_the_ties():
    assert roc_auc([1, 1, 0, 0], [0.9, 0.8, 0.2, 0.1]) == 1.0
    assert roc_auc([1, 1, 0, 0], [0.1, 0.2, 0.8, 0.9]) == 0.0
    assert roc_auc([1, 0], [0.5, 0.5]) == 0.5
    assert roc_auc([1, 0, 1, 0], [0.7, 0.7, 0.9, 0.1]) == pytest.approx((1 + 0.5 + 1 + 1) / 4)
    assert roc_auc([1, 1], [0.2, 0.3]) is None


@pytest.fixture(scope="module")
def spadec_parts(tiny_zoo, zoo_models):
    """SpaDec's parts for the tiny zoo (``tiny_spadec_request``), built once for the module."""
    from training.artifacts import build_artifact, load_artifact

    request = tiny_spadec_request(tiny_zoo)
    manifest = build_artifact(request, log=lambda message: None)
    models, _ = zoo_models
    return manifest, load_artifact(request, models.target)


def tiny_spadec_request(tiny_zoo):
    """The tiny zoo's SpaDec artefact request: a tiny D-LLM target, a tiny head on it, a predictor fitted on two
    prompts per source."""
    from pathlib import Path

    from tests.test_dllm import TINY_DLLM
    from tests.test_eagle import TINY_HEAD
    from training.artifacts import load_train_config

    config = {"kind": "spadec", "dllm": TINY_DLLM, "head": TINY_HEAD, "prompts": ["zoo:code", "zoo:math"],
              "count": 3, "max_new_tokens": 16, "total_tokens": 8, "depth": 3, "top_k": 2, "steps": 100}
    return load_train_config(config, "train.spadec", Path("."), tiny_zoo)


def test_the_spadec_artefact_fits_a_predictor_on_logged_acceptance(spadec_parts):
    manifest, parts = spadec_parts
    metrics = manifest["metrics"]
    assert metrics["loss_after"] < metrics["loss_before"]
    assert metrics["train_nodes"] > 0 and metrics["eval_nodes"] > 0 and 0 < metrics["accepted_share"] < 1
    assert parts.split == metrics["split"] >= 1 and parts.target.layer_count > parts.split


def test_spadec_predictor_on_sends_fewer_nodes_deep_than_off_and_reports_it(spadec_parts, zoo_models, zoo_prompts):
    from strategies import ModelSet, Sampling, build

    _, parts = spadec_parts
    models = ModelSet(target=zoo_models[0].target, artifacts={"spadec": parts})
    traces = {mode: build("spadec", {"spadec": "spadec", "predictor": mode, "total_tokens": 8, "depth": 3,
                                     "top_k": 2}, models).generate(zoo_prompts[0], 16, Sampling())
              for mode in ("off", "on")}
    off, on = traces["off"].extras, traces["on"].extras
    assert off["deep_nodes"] == off["tree_nodes"] > 0
    assert on["deep_nodes"] < on["tree_nodes"]
    assert all(trace.new_tokens == 16 and trace.extras["lossy"] for trace in traces.values())
    assert off["predictor_nodes"] > 0 and off["routed_layers"] > 0


@pytest.mark.parametrize("mode", ["off", "on"])
def test_spadec_decodes_in_bfloat16(spadec_parts, tiny_zoo, zoo_prompts, mode):
    """The artefact loads onto a bfloat16 target and decodes the full budget (lossy: nothing to match)."""
    from harness.core.models import ModelSpec, load_model
    from strategies import ModelSet, Sampling, build
    from training.artifacts import load_artifact

    target = load_model(ModelSpec("zoo:target", dtype="bfloat16"), tiny_zoo, torch.device("cpu"), "target")
    parts = load_artifact(tiny_spadec_request(tiny_zoo), target)
    models = ModelSet(target=target, artifacts={"spadec": parts})
    trace = build("spadec", {"spadec": "spadec", "predictor": mode, "total_tokens": 8, "depth": 3, "top_k": 2},
                  models).generate(zoo_prompts[0], 16, Sampling())
    assert trace.new_tokens == 16 and trace.extras["lossy"] and trace.extras["tree_nodes"] > 0
