"""The second hardening pass, class by class: numbers that are not numbers, valid text that was refused, paths that
escape, an unchecked $SPECSWEEP_HOME, caches that rot, hubs that are not there, and every problem at once."""

from __future__ import annotations

import errno
import json
import math
from pathlib import Path

import pytest
import yaml

from harness.core.checksums import CorruptCache, corrupt_files, file_digests, verify_files
from harness.core.errors import ConfigError, InfraError
from harness.core.numbers import read_number
from harness.core.paths import checked_home
from harness.core.records import CellRecord
from harness.core.results import ResultStore
from harness.core.yaml_file import parse_yaml
from harness.driver.cli import main
from harness.driver.hub_probe import check_hub
from harness.driver.overrides import apply_overrides
from tests.conftest import write_sweep
from tests.test_hardening import one_line, run


def errors_of(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("specsweep: error:")]


# ----------------------------------------------------------------------------- numbers that are not numbers

@pytest.mark.parametrize("value, kind, expected", [
    (float("nan"), float, "expected a finite number, got nan"),
    (float("inf"), float, "expected a finite number, got inf"),
    ("0.5", float, "expected a number, got the text '0.5'; write it without quotes: 0.5"),
    (1000.0, int, "expected an integer, got 1000.0"),
    (True, float, "expected a number, got True"),
])
def test_numbers_must_be_finite_numbers_of_their_kind(value, kind, expected):
    with pytest.raises(ConfigError) as raised:
        read_number(value, kind, "x.y")
    assert str(raised.value) == "x.y: " + expected or str(raised.value).startswith("x.y: " + expected + ";")
    assert read_number(3, float, "x") == 3.0 and isinstance(read_number(3, float, "x"), float)


def test_exponents_without_a_dot_are_numbers_as_in_yaml_1_2():
    assert parse_yaml("a: 1e9\nb: 3E-4\nc: -2e+5\nd: 1.5e3\ne: '1e9'\nf: 1e\n", "f", "t") == \
        {"a": 1e9, "b": 3e-4, "c": -2e5, "d": 1500.0, "e": "1e9", "f": "1e"}


def test_a_nan_temperature_and_a_nan_param_are_refused_together_before_anything_starts(tmp_path, capsys, no_start):
    write_sweep(tmp_path / "sweep.yaml", run={"temperature": float("nan"), "cell_timeout_s": float("inf")},
                strategies=[{"name": "hf_assisted", "params": {"draft": "small", "confidence_threshold": float("nan")}}])
    code, lines = run(tmp_path, capsys)
    assert code == 2
    assert sorted(line.split(": ")[2] for line in errors_of(lines)) == [
        "run.cell_timeout_s", "run.temperature", "strategies[0].confidence_threshold"], lines


def test_records_are_strict_json_even_when_a_metric_is_not_finite(tmp_path):
    cell = {"target": ["t", {"id": "zoo:target"}], "strategy": "s", "params": {}, "prompt_set": {"name": "p"},
            "shard": 0}
    ResultStore(tmp_path).append(CellRecord(cell_id="c", kind="strategy", label="c", cell=cell,
                                            timing={"step_drift": math.nan, "ceiling": math.inf}))
    line = (tmp_path / "cells.jsonl").read_text()
    row = json.loads(line, parse_constant=lambda name: pytest.fail(f"non-standard JSON constant {name}"))
    assert row["timing"] == {"step_drift": None, "ceiling": None}


# ----------------------------------------------------------------------------- text that is valid but was refused

def test_a_prompt_line_holding_a_raw_line_separator_reads_and_a_bad_one_keeps_its_column(tmp_path, capsys, no_start):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"question_id": 1, "turns": ["one\u2028two\u0085three"]}\n', encoding="utf-8")
    write_sweep(tmp_path / "sweep.yaml", prompts=[{"name": "x", "source": str(prompts)}])
    assert run(tmp_path, capsys, "--dry-run")[0] == 0
    from harness.core.prompts import load_prompts
    from harness.driver.config import load_sweep

    (prompt,) = load_prompts(load_sweep(tmp_path / "sweep.yaml").prompt_sets[0])
    assert prompt.turns == ("one\u2028two\u0085three",)
    prompts.write_text('{"question_id": 1, "turns": ["a"],}\n')
    code, lines = run(tmp_path, capsys)
    assert code == 2
    one_line(lines, "line 1 is not JSON (Expecting property name enclosed in double quotes at column 35)")


# ----------------------------------------------------------------------------- paths that escape

@pytest.mark.parametrize("name", ["../../escape", "/tmp/elsewhere", "a/b", "..", ".hidden"])
def test_a_run_name_is_one_plain_directory_name(tmp_path, capsys, no_start, name):
    write_sweep(tmp_path / "sweep.yaml")
    code, lines = run(tmp_path, capsys, "--run-name", name)
    assert code == 2
    one_line(lines, f"--run-name: {name!r} is not a plain directory name")
    assert not (tmp_path / "results").exists() and not (tmp_path.parent / "escape").exists()


# ----------------------------------------------------------------------------- $SPECSWEEP_HOME

def test_specsweep_home_must_be_a_writable_directory(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    for home, expected in ((tmp_path / "file", "is a file, not a directory"),
                           (tmp_path / "file" / "below", "is a file, not a directory")):
        monkeypatch.setenv("SPECSWEEP_HOME", str(home))
        with pytest.raises(InfraError, match=f"SPECSWEEP_HOME {home}: .*{expected}; point SPECSWEEP_HOME at a "
                                             "writable directory"):
            checked_home()
    monkeypatch.setenv("SPECSWEEP_HOME", str(tmp_path / "new" / "home"))
    assert checked_home() == tmp_path / "new" / "home" and (tmp_path / "new" / "home").is_dir()

    def read_only(self, data):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(Path, "write_bytes", read_only)
    with pytest.raises(InfraError, match="is not writable \\(read-only filesystem\\)"):
        checked_home()


def test_a_run_with_an_unusable_home_is_exit_3_before_anything_starts(tmp_path, capsys, no_start, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("SPECSWEEP_HOME", str(tmp_path / "file"))
    write_sweep(tmp_path / "sweep.yaml")
    code, lines = run(tmp_path, capsys)
    assert code == 3
    one_line(lines, f"$SPECSWEEP_HOME {tmp_path / 'file'}: {tmp_path / 'file'} is a file, not a directory")
    assert not (tmp_path / "results").exists()


# ----------------------------------------------------------------------------- caches that rot

def test_checksums_name_a_cut_an_altered_and_a_missing_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"x" * 100)
    (tmp_path / "sub" / "b.bin").write_bytes(b"y" * 10)
    (tmp_path / "c.bin").write_bytes(b"z")
    (tmp_path / "manifest.json").write_text("{}")
    recorded = file_digests(tmp_path, skip={"manifest.json"})
    assert sorted(recorded) == ["a.bin", "c.bin", "sub/b.bin"]
    assert corrupt_files(tmp_path, recorded) == []
    (tmp_path / "a.bin").write_bytes(b"x" * 50)
    (tmp_path / "sub" / "b.bin").write_bytes(b"Y" * 10)
    (tmp_path / "c.bin").unlink()
    assert corrupt_files(tmp_path, recorded) == ["a.bin has 50 bytes, 100 recorded", "c.bin is missing",
                                                 "sub/b.bin differs from its recorded SHA-256"]
    assert corrupt_files(tmp_path, recorded, under="sub/") == ["sub/b.bin differs from its recorded SHA-256"]
    with pytest.raises(CorruptCache, match=r"model x at .* is corrupt: a.bin has 50 bytes, 100 recorded \(and 2 "
                                           r"more\); rebuild it"):
        verify_files(tmp_path, {"files": recorded}, "model x", "rebuild it")
    verify_files(tmp_path, {}, "an old manifest", "")  # built before checksums: nothing to verify


def test_a_cut_zoo_weight_file_is_named_rebuilt_by_zoo_build_and_found_by_fsck(tiny_zoo, tmp_path, monkeypatch,
                                                                             capsys):
    import shutil

    from harness.core.models import ModelSpec, pretrained_location
    from harness.core.zoo_spec import zoo_dir
    from training.zoo import build_zoo

    home = tmp_path / "home"
    shutil.copytree(zoo_dir(tiny_zoo), home / "zoo" / zoo_dir(tiny_zoo).name)
    monkeypatch.setenv("SPECSWEEP_HOME", str(home))
    assert main(["fsck"]) == 0
    weights = next((zoo_dir(tiny_zoo) / "draft-1l").glob("*.safetensors"))
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[: size // 2])
    with pytest.raises(CorruptCache, match=f"zoo .* model 'draft-1l' at .* is corrupt: draft-1l/{weights.name} has "
                                           f"{size // 2:,} bytes, {size:,} recorded; run `specsweep zoo build`"):
        pretrained_location(ModelSpec("zoo:draft-1l"), tiny_zoo)
    pretrained_location(ModelSpec("zoo:target"), tiny_zoo)  # the other models' files still verify
    capsys.readouterr()
    assert main(["fsck"]) == 1
    assert f"draft-1l/{weights.name} has {size // 2:,} bytes" in capsys.readouterr().out
    messages: list[str] = []
    build_zoo(tiny_zoo, log=messages.append)
    assert "rebuilding it" in messages[0] and weights.stat().st_size == size
    pretrained_location(ModelSpec("zoo:draft-1l"), tiny_zoo)
    assert main(["fsck"]) == 0


# ----------------------------------------------------------------------------- hubs that are not there

def hub_sweep(tmp_path: Path, **overrides):
    from harness.driver.config import load_sweep

    settings = dict(models={"target": "HuggingFaceTB/SmolLM2-135M-Instruct", "drafts": {}, "device": "cpu"},
                    strategies=[{"name": "prompt_lookup"}])
    settings.update(overrides)
    return load_sweep(write_sweep(tmp_path / "sweep.yaml", **settings))


def test_hub_ids_are_probed_before_ray_starts_and_offline_is_one_line_each(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf"))
    sweep = hub_sweep(tmp_path, prompts=[{"name": "q", "source": "hf:openai/gsm8k", "split": "test",
                                          "field": "question"}])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError) as raised:
        check_hub(sweep, probe=lambda *args: pytest.fail("offline: no probe"))
    lines = str(raised.value).splitlines()
    assert lines == [
        "models.targets.target.id: hub model 'HuggingFaceTB/SmolLM2-135M-Instruct' is not in the local Hugging Face "
        "cache and HF_HUB_OFFLINE is set; download it where the hub is reachable (hf download "
        "HuggingFaceTB/SmolLM2-135M-Instruct) into this machine's Hugging Face cache, or unset HF_HUB_OFFLINE",
        "prompts[0].source: hub dataset 'openai/gsm8k' is not in the local Hugging Face cache and HF_HUB_OFFLINE is "
        "set; download it where the hub is reachable (hf download openai/gsm8k --repo-type dataset) into this "
        "machine's Hugging Face cache, or unset HF_HUB_OFFLINE"]
    monkeypatch.delenv("HF_HUB_OFFLINE")
    probed: list[tuple] = []
    with pytest.raises(ConfigError, match="the hub is not reachable \\(ConnectError\\)"):
        check_hub(sweep, probe=lambda *args: probed.append(args) or "the hub is not reachable (ConnectError)")
    assert probed == [("model", "HuggingFaceTB/SmolLM2-135M-Instruct", None), ("dataset", "openai/gsm8k", None)]
    check_hub(sweep, probe=lambda *args: None)  # reachable
    snapshot = tmp_path / "hf" / "models--HuggingFaceTB--SmolLM2-135M-Instruct" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (tmp_path / "hf" / "datasets--openai--gsm8k" / "snapshots" / "def").mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    check_hub(sweep, probe=lambda *args: pytest.fail("cached: no probe"))  # cached: fine offline


def test_an_offline_hub_model_exits_2_from_the_command_line(tmp_path, capsys, no_start, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf"))
    write_sweep(tmp_path / "sweep.yaml", models={"target": "HuggingFaceTB/SmolLM2-135M-Instruct", "drafts": {},
                                                 "device": "cpu"}, strategies=[{"name": "prompt_lookup"}])
    code, lines = run(tmp_path, capsys)
    assert code == 2
    one_line(lines, "models.targets.target.id: hub model 'HuggingFaceTB/SmolLM2-135M-Instruct' is not in the local")


# ----------------------------------------------------------------------------- every problem at once

def test_every_problem_of_a_strategy_entry_is_reported(tmp_path, capsys, no_start):
    write_sweep(tmp_path / "sweep.yaml", strategies=[
        {"name": "speculative", "params": {"draft": "small", "gamma": 0, "schedule": "sometimes", "gama": 2}},
        {"name": "cascade", "params": {"drafts": ["small"], "k_matrix": [[-1]], "lenience": 0.5}},
        {"name": "speculative", "params": [1], "grid": {"gamma": 3}, "runtime_env": "x"}])
    code, lines = run(tmp_path, capsys)
    assert code == 2
    fields = [line.split(": ")[2] for line in errors_of(lines)]
    assert fields == ["strategies[0].gama", "strategies[0].gamma", "strategies[0].schedule",
                      "strategies[1].k_matrix", "strategies[1].k_matrix", "strategies[1].lenience",
                      "strategies[2].params", "strategies[2].runtime_env", "strategies[2].grid.gamma"], lines


def test_every_bad_set_value_is_reported():
    with pytest.raises(ConfigError) as raised:
        apply_overrides({"run": {}, "prompts": [{}]}, ["run.max_new_tokens", "prompts[7].count=1", "run.x=[",
                                                       "run.seed=3"])
    assert [line.split(": ", 1)[1] for line in str(raised.value).splitlines()] == [
        "'run.max_new_tokens' has no '='; write KEY=VALUE, e.g. run.max_new_tokens=16",
        "prompts[7] does not exist; index an existing list entry",
        "cannot read the value of 'run.x': '['; give a YAML value"]
    assert yaml.safe_load(yaml.safe_dump(apply_overrides({"run": {}}, ["run.temperature=1e-3"]))) == \
        {"run": {"temperature": 0.001}}
