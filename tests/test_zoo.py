"""The zoo build: only the models a sweep needs; a domain-limited draft added later, or to a built zoo, trains on top
of it as a full build would; what an artefact's key takes from the zoo."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from safetensors.torch import load_file

from harness.core.errors import ConfigError
from harness.core.zoo_spec import ZooConfig, built_models, is_built, model_path
from tests.conftest import TINY_ZOO
from training.artifacts import load_train_config
from training.zoo import build_zoo, reusable_base

MICRO = {**TINY_ZOO, "pretrain": {"steps": 8, "batch_size": 4, "warmup_steps": 2},
         "distill": {"steps": 6, "batch_size": 4, "warmup_steps": 2},
         "drafts": [{"name": "draft-1l", "layers": 1, "hidden": 64, "intermediate": 128, "heads": 2}]}
GENERAL = {"name": "draft-general", "layers": 1, "hidden": 64, "intermediate": 128, "heads": 2, "domains": ["code"]}


def weights(config: ZooConfig, name: str) -> dict:
    return load_file(model_path(config, name) / "model.safetensors")


def test_a_domain_limited_draft_builds_on_top_of_a_built_zoo_with_full_build_weights(tmp_path, monkeypatch):
    base = ZooConfig.from_dict(MICRO)
    extended = ZooConfig.from_dict({**MICRO, "drafts": [*MICRO["drafts"], GENERAL]})
    assert base.key() != extended.key()

    monkeypatch.setenv("SPECSWEEP_HOME", str(tmp_path / "incremental"))
    build_zoo(base, log=lambda message: None)
    assert reusable_base(extended) == base
    messages: list[str] = []
    build_zoo(extended, log=messages.append)
    assert f"on top of {base.key()}" in messages[0]
    assert not any("target step" in message for message in messages)  # the target was not trained again
    incremental = {name: weights(extended, name) for name in extended.model_names}

    monkeypatch.setenv("SPECSWEEP_HOME", str(tmp_path / "full"))
    assert reusable_base(extended) is None
    build_zoo(extended, log=lambda message: None)
    for name in extended.model_names:
        full = weights(extended, name)
        assert full.keys() == incremental[name].keys()
        assert all((full[key] == incremental[name][key]).all() for key in full), name


def test_a_build_for_some_models_leaves_out_unnamed_domain_drafts_and_adds_them_later_with_full_build_weights(
        tmp_path, monkeypatch):
    config = ZooConfig.from_dict({**MICRO, "drafts": [*MICRO["drafts"], GENERAL]})
    monkeypatch.setenv("SPECSWEEP_HOME", str(tmp_path / "partial"))
    manifest = build_zoo(config, log=lambda message: None, only=["target", "draft-1l"])
    assert list(manifest["models"]) == ["target", "draft-1l"] and built_models(config) == ("target", "draft-1l")
    assert is_built(config, ["draft-1l"]) and not is_built(config) and not is_built(config, ["draft-general"])
    assert not (model_path(config, "draft-general")).exists()
    messages: list[str] = []
    build_zoo(config, log=messages.append, only=["draft-general"])
    assert "(adding draft-general)" in messages[0]
    assert not any("target step" in message or "draft-1l step" in message for message in messages)
    assert is_built(config) and built_models(config) == config.model_names
    partial = {name: weights(config, name) for name in config.model_names}

    monkeypatch.setenv("SPECSWEEP_HOME", str(tmp_path / "full"))
    build_zoo(config, log=lambda message: None)
    for name in config.model_names:
        full = weights(config, name)
        assert all((full[key] == partial[name][key]).all() for key in full), name


def test_a_build_for_the_first_draft_leaves_out_the_later_ones_and_adds_them_later_with_full_build_weights(
        tmp_path, monkeypatch):
    """All-domain drafts draw their batches in turn from one stream: building only the first skips the rest, and
    adding the second later replays the stream past the target's and the first draft's batches."""
    second = {"name": "draft-2l", "layers": 2, "hidden": 64, "intermediate": 128, "heads": 2}
    config = ZooConfig.from_dict({**MICRO, "drafts": [*MICRO["drafts"], second]})
    monkeypatch.setenv("SPECSWEEP_HOME", str(tmp_path / "partial"))
    build_zoo(config, log=lambda message: None, only=["target", "draft-1l"])
    assert built_models(config) == ("target", "draft-1l") and is_built(config, ["draft-1l"])
    assert not is_built(config, ["draft-2l"])
    messages: list[str] = []
    build_zoo(config, log=messages.append, only=["draft-2l"])
    assert "(adding draft-2l)" in messages[0]
    assert not any("target step" in message or "draft-1l step" in message for message in messages)
    partial = {name: weights(config, name) for name in config.model_names}

    monkeypatch.setenv("SPECSWEEP_HOME", str(tmp_path / "full"))
    build_zoo(config, log=lambda message: None)
    for name in config.model_names:
        full = weights(config, name)
        assert all((full[key] == partial[name][key]).all() for key in full), name


def test_an_unlimited_draft_is_never_built_on_top(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECSWEEP_HOME", str(tmp_path))
    base = ZooConfig.from_dict(MICRO)
    build_zoo(base, log=lambda message: None)
    unlimited = {**GENERAL}
    del unlimited["domains"]
    assert reusable_base(ZooConfig.from_dict({**MICRO, "drafts": [*MICRO["drafts"], unlimited]})) is None


def test_the_zoo_key_follows_its_models_and_domains_are_checked():
    default = ZooConfig()
    without_general = dataclasses.replace(default, drafts=tuple(d for d in default.drafts if not d.domains))
    assert without_general.key() != default.key() == ZooConfig().key()
    with pytest.raises(ConfigError, match=r"zoo\.drafts\[0\]\.domains: expected a non-empty list of zoo domains"):
        ZooConfig.from_dict({"drafts": [{"name": "d", "layers": 1, "domains": ["poetry"]}]})


def test_a_model_added_to_the_zoo_invalidates_zoo_model_artefacts_only():
    default = ZooConfig()
    grown = dataclasses.replace(default, drafts=(*default.drafts, ZooConfig.from_dict({"drafts": [GENERAL]}).drafts[0]))
    on_zoo_text = {"kind": "eagle", "target": "pkg:smollm2-135m", "data": {"sources": ["answers:zoo:code", "zoo:prose"]}}
    on_zoo_model = {"kind": "eagle", "target": "zoo:target", "data": {"sources": ["zoo:code"]}}
    on_own_text = {"kind": "eagle", "target": "pkg:smollm2-135m", "data": {"sources": ["/data/chat.txt"]}}

    def key(raw: dict, zoo: ZooConfig) -> str:
        return load_train_config(raw, "train", Path("."), zoo).key()

    assert key(on_zoo_text, default) == key(on_zoo_text, grown)
    assert key(on_zoo_model, default) != key(on_zoo_model, grown)
    assert key(on_own_text, default) == key(on_own_text, grown)
    corpus_changed = dataclasses.replace(default, corpus=dataclasses.replace(default.corpus, prose_chars=10_000))
    assert key(on_zoo_text, default) != key(on_zoo_text, corpus_changed)


def test_the_zoo_key_covers_the_corpus_text_this_installation_reads(monkeypatch):
    """Two installations whose licence files differ read different ``legal`` text: they get different keys."""
    from harness.core import corpus

    config = ZooConfig.from_dict(TINY_ZOO)
    before = config.key()
    original = corpus.legal_documents
    extra = corpus.Document("legal", "another-package/LICENSE", "Permission is hereby granted. " * 20)
    monkeypatch.setattr(corpus, "legal_documents", lambda max_chars: [*original(max_chars), extra])
    corpus.build_corpus.cache_clear()
    corpus.corpus_digest.cache_clear()
    try:
        assert config.key() != before
    finally:
        corpus.build_corpus.cache_clear()
        corpus.corpus_digest.cache_clear()
    monkeypatch.undo()
    assert config.key() == before


def test_the_legal_corpus_does_not_depend_on_where_a_process_starts(tmp_path, monkeypatch):
    """A directory on sys.path with in-tree metadata (a repository's .egg-info, seen by a Ray worker started in
    the repository) adds no licence: the driver and its workers read one corpus and compute one zoo key."""
    from harness.core import corpus

    before = [doc.doc_id for doc in corpus.legal_documents(10_000_000)]
    info = tmp_path / "inplace.egg-info"
    info.mkdir()
    (info / "PKG-INFO").write_text("Metadata-Version: 2.1\nName: inplace\nVersion: 0.1\n")
    (info / "SOURCES.txt").write_text("LICENSE\n")
    (tmp_path / "LICENSE").write_text("In-tree licence text that only a process started here would see. " * 10)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib.metadata

    assert "inplace" in {dist.metadata["Name"] for dist in importlib.metadata.distributions()}  # it is visible
    assert [doc.doc_id for doc in corpus.legal_documents(10_000_000)] == before
