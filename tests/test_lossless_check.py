"""The tie-aware lossless check: outside float32 a divergence from the baseline is a numerical tie or a real
divergence; a broken verifier is caught, a correct strategy never is."""

from __future__ import annotations

import copy

import pytest
import torch
import yaml

from harness.core.divergence import TIE_ULPS, classify, tie_bound, unit_in_last_place
from harness.core.results import ResultStore
from harness.driver.cli import main
from tests.conftest import TESTS, write_sweep
from tests.test_eagle import TINY_HEAD


@pytest.mark.parametrize("value, dtype, spacing", [
    (1.0, torch.bfloat16, 2 ** -7), (10.0, torch.bfloat16, 2 ** -4), (-40.0, torch.bfloat16, 2 ** -2),
    (0.75, torch.bfloat16, 2 ** -8), (10.0, torch.float16, 2 ** -7), (10.0, torch.float32, 2 ** -20),
])
def test_unit_in_last_place_is_the_dtypes_spacing(value, dtype, spacing):
    assert unit_in_last_place(value, dtype) == spacing
    assert dtype != torch.float32 or float(torch.tensor(abs(value) + spacing, dtype=dtype)) != abs(value)


def test_the_tie_bound_is_the_larger_of_the_units_and_the_measured_error():
    # logits of 12.0: bfloat16 spacing 1/16, so two units are 0.125
    assert tie_bound((12.0, 11.9), [(12.0, 11.9)], torch.bfloat16) == TIE_ULPS / 16
    # the dtype's own error on the two logits (0.2 + 0.1 on its worst path), once for each side, is larger
    assert tie_bound((12.0, 11.9), [(12.0, 11.9), (12.2, 11.8)], torch.bfloat16) == pytest.approx(0.6)


def test_classify_calls_a_clear_second_choice_real_and_a_shared_first_choice_a_tie(zoo_models, zoo_prompts):
    models, _ = zoo_models
    reference = models.target.model
    in_dtype = copy.deepcopy(reference).to(torch.bfloat16)
    prompt = zoo_prompts[0]
    logits = reference(input_ids=torch.tensor([prompt])).logits[0, -1]
    top = logits.topk(len(logits))
    gaps = top.values[0] - top.values
    clear = int(top.indices[int((gaps > 1.0).nonzero()[0])])  # a token ranked below the top by over a logit
    first = int(top.indices[0])
    real = classify(reference, in_dtype, prompt, [first], [clear], 0, eos_token_id=0)
    assert real.kind == "real" and real.gap > 1.0 and real.gap > real.bound
    same = classify(reference, in_dtype, prompt, [first], [first], 0, eos_token_id=0)
    assert same.kind == "tie" and same.gap == 0


BFLOAT16_STRATEGIES = [
    {"name": "speculative", "params": {"draft": "small", "gamma": 3}},
    {"name": "prompt_lookup", "params": {"num_tokens": 4}},
    {"name": "cascade", "params": {"drafts": ["small"], "use_mag": True, "k_matrix": [[2, 1], [0, 2]]}},
    {"name": "eagle", "params": {"head": "head", "gamma": 3}},
    {"name": "eagle2", "params": {"head": "head", "total_tokens": 8, "depth": 3, "top_k": 3}},
    {"name": "hf_greedy"},
    {"name": "hf_assisted", "params": {"draft": "small", "num_assistant_tokens": 3}},
    {"name": "hf_prompt_lookup", "params": {"num_tokens": 4}},
]


def test_bfloat16_sweep_fails_a_broken_verifier_as_a_real_divergence_and_never_flags_a_correct_one(
        tmp_path, tiny_zoo, capsys):
    (tmp_path / "head.yaml").write_text(yaml.safe_dump(TINY_HEAD))
    path = write_sweep(
        tmp_path / "sweep.yaml", plugins=[str(TESTS / "plugins" / "broken_verifier.py")], train={"head": "head.yaml"},
        models={"target": "zoo:target", "drafts": {"small": "zoo:draft-1l"}, "device": "cpu", "dtype": "bfloat16"},
        prompts=[{"name": "code", "source": "zoo:code", "count": 3}],
        strategies=[*BFLOAT16_STRATEGIES,
                    {"name": "broken_speculative", "params": {"draft": "small", "gamma": 3, "margin": 0.5}}],
        run={"max_new_tokens": 24, "warmup_prompts": 1, "workers": 1, "num_cpus": 2, "pairing": "interleaved"})
    run_dir = tmp_path / "results" / "tiny" / "r"
    assert main(["run", str(path), "--results-dir", str(tmp_path / "results"), "--run-name", "r"]) == 1
    records = {r.strategy: r for r in ResultStore(run_dir).records() if r.kind == "strategy"}

    broken = records["broken_speculative"]
    assert broken.status == "failed" and "real divergences" in broken.error and "bfloat16" in broken.error
    kinds = [turn.divergence.kind for prompt in broken.prompts for turn in prompt.turns if turn.divergence]
    assert "real" in kinds
    for turn in (turn for prompt in broken.prompts for turn in prompt.turns if turn.divergence):
        assert turn.divergence.kind == ("tie" if turn.divergence.gap <= turn.divergence.bound else "real")

    # Every other strategy runs in bfloat16 and is never flagged: each turn matches or is a tie.
    assert set(records) == {entry["name"] for entry in BFLOAT16_STRATEGIES} | {"broken_speculative"}
    for name, record in records.items():
        if name == "broken_speculative":
            continue
        assert record.ok, (name, record.error)
        assert record.env.dtype == "bfloat16"
        turns = [turn for prompt in record.prompts for turn in prompt.turns]
        assert all(turn.tokens_match or turn.divergence.kind == "tie" for turn in turns), name
        assert all(turn.divergence is None for turn in turns if turn.tokens_match), name

    report = (run_dir / "report.md").read_text()
    assert "tie-divergent turns" in report and "real divergences" in report
    row = next(line for line in report.splitlines() if line.startswith("| broken_speculative"))
    assert int(row.split("|")[8]) == kinds.count("real") >= 1  # the real-divergence column counts them


def test_a_token_the_target_ties_with_its_first_choice_is_a_tie_not_a_real_divergence(zoo_models, zoo_prompts):
    """Make two tokens' logits equal to within float32 noise (their output rows equal up to 1e-6): a strategy that
    picks the other one has not erred, whatever the dtype rounded."""
    models, _ = zoo_models
    reference = copy.deepcopy(models.target.model)
    prompt = zoo_prompts[1]
    first, second = (int(i) for i in reference(input_ids=torch.tensor([prompt])).logits[0, -1].topk(2).indices)
    with torch.no_grad():
        head = reference.get_output_embeddings().weight
        head[second] = head[first] * (1 + 1e-6)
    in_dtype = copy.deepcopy(reference).to(torch.bfloat16)
    tie = classify(reference, in_dtype, prompt, [first], [second], 0, eos_token_id=0)
    assert tie.kind == "tie" and tie.gap <= tie.bound
    assert tie.bound >= TIE_ULPS * unit_in_last_place(tie.logit, torch.bfloat16)
