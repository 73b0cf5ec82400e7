"""Adaptive drafts: failure positions, the OSD losses, and one round that logs failures and trains an adapter."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from strategies.base import Step


def test_corrected_positions_mark_the_targets_replacements():
    from training.adaptive import corrected_positions

    # prompt of 10; step 1 keeps 2 of 4 (correction at 12), step 2 keeps all 4 (+ bonus), step 3 keeps 0 of 4.
    steps = [Step(drafted=4, accepted=2), Step(drafted=4, accepted=4), Step(drafted=4, accepted=0)]
    assert corrected_positions(10, steps) == [12, 18]


def test_osd_losses_vanish_on_equal_distributions_and_differ_otherwise():
    from training.adaptive import osd_loss

    p = torch.tensor([[2.0, 0.0, -1.0]])
    q = torch.tensor([[0.0, 1.0, 0.0]])
    for loss in ("forward_kl", "reverse_kl", "mix"):
        assert osd_loss(p, p, loss, 0.5).item() == pytest.approx(0.0, abs=1e-6)
    forward, reverse = osd_loss(q, p, "forward_kl", 0.5).item(), osd_loss(q, p, "reverse_kl", 0.5).item()
    assert forward > 0 and reverse > 0 and forward != pytest.approx(reverse)
    assert osd_loss(q, p, "mix", 0.25).item() == pytest.approx(0.25 * forward + 0.75 * reverse, rel=1e-5)


def test_one_round_logs_failures_and_trains_an_adapter(tmp_path, tiny_zoo):
    from training.adaptive import load_adaptive_config, run_adaptive

    path = tmp_path / "adaptive.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tiny-adaptive", "domain": "math", "rounds": 1, "prompts_per_round": 3, "heldout_prompts": 2,
        "gamma": 3, "max_new_tokens": 24, "threshold": 1.01, "retrain_every": 2, "steps": 4, "batch_size": 2,
        "launch": {"num_workers": 1, "cpus_per_worker": 1},
    }))
    config = load_adaptive_config(path, tiny_zoo.model_names)
    rows = run_adaptive(config, tiny_zoo, tmp_path / "run", log=lambda message: None)
    assert [row["round"] for row in rows] == [0, 1]
    assert rows[0]["retrained"] and rows[0]["failures"] >= 2
    assert rows[0]["adapter"] == "none" and rows[1]["adapter"] != "none"
    cases = [json.loads(line) for line in (tmp_path / "run" / "failures.jsonl").read_text().splitlines()]
    assert len(cases) == rows[0]["failures"]
    for case in cases:
        assert case["corrected"] and all(0 < position < len(case["tokens"]) for position in case["corrected"])
    assert (tmp_path / "run" / "rounds.csv").exists() and (tmp_path / "run" / "alpha.png").exists()
