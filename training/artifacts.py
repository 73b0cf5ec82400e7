"""Trainable artefacts: kinds registered by name, training configs, and the content-addressed cache.

A training config is a YAML mapping with ``kind`` (``eagle``, ...) and that
kind's settings. An :class:`ArtifactRequest` is one config bound to a target;
its key hashes everything that determines the result, and names the
directory ``$SPECSWEEP_HOME/artifacts/<kind>/<key>`` where the build lands
(with ``artifact.json`` written last, so a half-built directory is never
taken for a finished one).
"""

from __future__ import annotations

import json
import platform
import re
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable


from harness.checksums import FILES_KEY, CorruptCache, file_digests
from harness.corpus import DOMAINS
from harness.errors import ConfigError
from harness.models import ARTIFACT_MANIFEST, ARTIFACT_PREFIX, ModelSpec, verify_artifact
from harness.paths import content_hash, specsweep_home
from harness.yaml_file import read_yaml

MANIFEST = ARTIFACT_MANIFEST
ZOO_REFERENCE = re.compile(r'"((?:answers:)?zoo:[\w-]+)"')  # a zoo model or zoo text named in a config's identity


@dataclass(frozen=True)
class ArtifactKind:
    """How to parse, build and load one kind of artefact."""

    name: str
    parse: Callable[[dict[str, Any], str, Path, tuple[str, ...]], Any]
    build: Callable[..., dict[str, Any]]
    load: Callable[[Any, Any], Any]  # (ArtifactRequest, target CausalLM) -> the loaded artefact


def _eagle_kind() -> ArtifactKind:
    # lazy: each kind's module loads its training stack (peft, Ray Train, DeepSpeed) only when used
    from strategies.eagle_head import load_head_lm
    from training.eagle import build_head, parse_eagle_config  # lazy: as above

    return ArtifactKind("eagle", parse_eagle_config, build_head, lambda request, target: load_head_lm(request.directory, target))


def _adapters_kind() -> ArtifactKind:
    # lazy: peft, Ray Train, DeepSpeed
    from training.adapters import DomainAdapters, build_adapters, parse_adapter_config

    return ArtifactKind("adapters", parse_adapter_config, build_adapters,
                        lambda request, target: DomainAdapters(request.directory, request.config, request.zoo, target.device,
                                                               str(target.dtype).removeprefix("torch.")))


def _router_kind() -> ArtifactKind:
    from training.router import build_router, load_router, parse_router_config  # lazy: Ray Train

    return ArtifactKind("router", parse_router_config, build_router, lambda request, target: load_router(request.directory))


def _alora_kind() -> ArtifactKind:
    # lazy: peft, Ray Train, DeepSpeed
    from training.alora import VARIANTS, build_alora, load_variant, parse_alora_config

    def load(request: "ArtifactRequest", target: Any) -> dict[str, Any]:
        return {variant: load_variant(request.directory, request.config, request.zoo, variant, target.device)
                for variant in VARIANTS}

    return ArtifactKind("alora", parse_alora_config, build_alora, load)


def _bigram_kind() -> ArtifactKind:
    from training.bigram import build_bigram, load_bigram, parse_bigram_config  # lazy: transformers

    return ArtifactKind("bigram", parse_bigram_config, build_bigram, lambda request, target: load_bigram(request.directory))


def _draft_kind() -> ArtifactKind:
    from training.draft import MODEL_DIR, build_draft, parse_draft_config  # lazy: Ray Train, DeepSpeed

    return ArtifactKind("draft", parse_draft_config, build_draft, lambda request, target: request.directory / MODEL_DIR)


def _dllm_kind() -> ArtifactKind:
    from training.dllm import build_dllm, load_dllm, parse_dllm_config  # lazy: peft, Ray Train, DeepSpeed

    return ArtifactKind("dllm", parse_dllm_config, build_dllm,
                        lambda request, target: load_dllm(request.directory, target.device, target.dtype))


def _spadec_kind() -> ArtifactKind:
    from training.spadec import build_spadec, load_spadec, parse_spadec_config  # lazy: peft, Ray Train, DeepSpeed

    return ArtifactKind("spadec", parse_spadec_config, build_spadec, load_spadec)


KINDS: dict[str, Callable[[], ArtifactKind]] = {
    "eagle": _eagle_kind, "adapters": _adapters_kind, "router": _router_kind, "alora": _alora_kind,
    "draft": _draft_kind, "bigram": _bigram_kind, "dllm": _dllm_kind, "spadec": _spadec_kind}


def artifact_kind(name: str, where: str = "kind") -> ArtifactKind:
    """The registered kind ``name``; ``ConfigError`` listing the choices if there is none."""
    if name not in KINDS:
        raise ConfigError(where, f"unknown artefact kind {name!r}", f"choose one of {', '.join(sorted(KINDS))}")
    return KINDS[name]()


@dataclass(frozen=True)
class ArtifactRequest:
    """A training config bound to its target and zoo: one artefact to build or reuse."""

    kind: str
    config: Any  # the kind's config (a ``TrainSettings`` dataclass); ``config.target``, if any, is its target
    zoo: Any  # harness.zoo_spec.ZooConfig (zoo targets and zoo text depend on it)

    def zoo_references(self) -> tuple[set[str], bool]:
        """The zoo names the config mentions anywhere, nested configs included (zoo models by name, zoo text by
        domain, each without its ``zoo:`` prefix), and whether it also names a trained artefact (``artifact:...``)."""
        named = json.dumps(self.config.identity(), default=str)
        names = {name.removeprefix("answers:").removeprefix("zoo:") for name in ZOO_REFERENCE.findall(named)}
        return names, ARTIFACT_PREFIX in named

    def target_key(self) -> str:
        """What the artefact's zoo inputs are keyed on: the zoo build's key when the config names a zoo model or a
        trained artefact, only the zoo corpus's settings when it names zoo text alone (so a model added to the zoo
        leaves a real target's artefacts trained on zoo text valid), nothing when it names neither."""
        names, names_artifact = self.zoo_references()
        if not names:
            return ""
        if not self.uses_zoo_models() and names <= set(DOMAINS) and not names_artifact:
            return content_hash(["zoo-corpus", asdict(self.zoo.corpus)])[:16]
        return self.zoo.key()

    def key(self) -> str:
        return content_hash([self.kind, self.config.identity(), self.target_key()])[:16]

    def uses_zoo_models(self) -> bool:
        """Whether the config names a zoo model (then the zoo must be built first; zoo text alone needs no models)."""
        return bool(self.zoo_references()[0] & set(self.zoo.model_names))

    @property
    def directory(self) -> Path:
        return specsweep_home() / "artifacts" / self.kind / self.key()

    def built(self) -> bool:
        return (self.directory / MANIFEST).exists()

    def manifest(self) -> dict[str, Any]:
        return json.loads((self.directory / MANIFEST).read_text())

    def model_id(self) -> str:
        """The model id (``artifact:<kind>/<key>``) under which a sweep loads a trained model, e.g. a draft."""
        return f"{ARTIFACT_PREFIX}{self.kind}/{self.key()}"

    def label(self) -> str:
        target = getattr(self.config, "target", None)
        return f"{self.kind}-{self.key()[:8]}" + (f" for {target.id}" if target is not None else "")


def load_train_config(source: str | Path | dict[str, Any], where: str, base_dir: Path, zoo,
                      expected_kind: str | None = None) -> ArtifactRequest:
    """A request from a training-config file path or inline mapping (with ``kind``), validated."""
    kind_name, config = parse_train_config(source, where, base_dir, zoo.model_names, expected_kind)
    return ArtifactRequest(kind_name, config, zoo)


def parse_train_config(source: str | Path | dict[str, Any], where: str, base_dir: Path, zoo_names: tuple[str, ...],
                       expected_kind: str | None = None) -> tuple[str, Any]:
    """The kind and validated config of a training-config file path (relative to ``base_dir``) or inline mapping;
    ``kind`` may be left out when ``expected_kind`` says it."""
    if isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        path = path if path.is_absolute() else base_dir / path
        if not path.is_file():
            raise ConfigError(where, f"training config {source} not found", "give the path of a training YAML file")
        raw = read_yaml(path, where, "training YAML file")
        base_dir = path.resolve().parent
    else:
        raw = source
    if not isinstance(raw, dict):
        raise ConfigError(where, "a training config must be a mapping with kind and settings", "add e.g. kind: eagle")
    raw = dict(raw)
    kind_name = raw.pop("kind", expected_kind)
    if not isinstance(kind_name, str):
        raise ConfigError(f"{where}.kind", "missing", f"add kind: one of {', '.join(sorted(KINDS))}")
    if expected_kind and kind_name != expected_kind:
        raise ConfigError(f"{where}.kind", f"the file trains {kind_name!r}, not {expected_kind!r}",
                          f"run `specsweep train {kind_name} ...`")
    return kind_name, artifact_kind(kind_name, f"{where}.kind").parse(raw, where, base_dir, zoo_names)


def for_target(request: ArtifactRequest, target: ModelSpec) -> ArtifactRequest:
    """The same training config bound to ``target`` (a sweep trains each head for the cell's own target).

    Training always reads the target in float32, so the dtype is not part of the artefact.
    Artefacts without a target (a router reads text only) are returned unchanged.
    """
    if not hasattr(request.config, "target"):
        return request
    return replace(request, config=replace(request.config, target=replace(target, dtype="float32")))


def build_artifact(request: ArtifactRequest, log: Callable[[str], None] = print, force: bool = False) -> dict[str, Any]:
    """Build ``request`` into its directory unless it is already there (and its files match their checksums);
    return its manifest."""
    if request.built() and not force:
        try:
            verify_artifact(request.directory)
            return request.manifest()
        except CorruptCache as error:
            log(f"{error}: retraining it")
            (request.directory / MANIFEST).unlink()
    if request.uses_zoo_models():
        from training.zoo import build_zoo, is_built  # lazy: builds only when a zoo model is missing

        if not is_built(request.zoo):
            build_zoo(request.zoo, log=log)
    kind = artifact_kind(request.kind)
    started = time.time()
    metrics = kind.build(request.config, request.zoo, request.directory, request.target_key(),
                         f"{request.kind}-{request.key()}", log=log)
    target = getattr(request.config, "target", None)
    manifest = {"kind": request.kind, "key": request.key(), "target": target.as_dict() if target else None,
                "seconds": time.time() - started, "host": platform.node(), "metrics": metrics,
                FILES_KEY: file_digests(request.directory, skip={MANIFEST})}
    (request.directory / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    log(f"built {request.label()} in {manifest['seconds']:.0f} s -> {request.directory}")
    return manifest


def load_artifact(request: ArtifactRequest, target) -> Any:
    """The built artefact of ``request`` loaded for ``target`` (a ``CausalLM``)."""
    if not request.built():
        raise FileNotFoundError(f"artefact {request.label()} is not built at {request.directory} on node "
                                f"{platform.node()}: on a multi-node cluster put $SPECSWEEP_HOME on a shared filesystem")
    verify_artifact(request.directory)
    return artifact_kind(request.kind).load(request, target)
