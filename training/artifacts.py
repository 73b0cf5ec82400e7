"""Trainable artefacts: kinds registered by name, training configs, and the content-addressed cache.

A training config is a YAML mapping with ``kind`` (``eagle``, ...) and that
kind's settings. An :class:`ArtifactRequest` is one config bound to a target;
its key hashes everything that determines the result, and names the
directory ``$SPECSWEEP_HOME/artifacts/<kind>/<key>`` where the build lands
(with ``artifact.json`` written last, so a half-built directory is never
taken for a finished one).
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import json
import pkgutil
import platform
import re
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

from harness.core.checksums import FILES_KEY, CorruptCache, file_digests
from harness.core.corpus import DOMAINS
from harness.core.errors import ConfigError
from harness.core.models import ARTIFACT_MANIFEST, ARTIFACT_PREFIX, ModelSpec, verify_artifact
from harness.core.paths import content_hash, specsweep_home
from harness.core.yaml_file import read_yaml
from training.zoo import build_zoo, is_built

MANIFEST = ARTIFACT_MANIFEST
ZOO_REFERENCE = re.compile(r'"((?:answers:)?zoo:[\w-]+)"')  # a zoo model or zoo text named in a config's identity


@dataclass(frozen=True)
class ArtifactKind:
    """How to parse, build and load one kind of artefact.

    Kind ``x`` lives in ``training/x.py``, which declares it as its module-level ``KIND``; the module (and with it
    its training stack: peft, Ray Train, DeepSpeed) is imported the first time the kind is named.
    """

    name: str
    parse: Callable[[dict[str, Any], str, Path, tuple[str, ...]], Any]
    build: Callable[..., dict[str, Any]]
    load: Callable[[Any, Any], Any]  # (ArtifactRequest, target CausalLM) -> the loaded artefact


def _declared_kind(module_name: str) -> ArtifactKind | None:
    kind = getattr(importlib.import_module(f"{__package__}.{module_name}"), "KIND", None)
    return kind if isinstance(kind, ArtifactKind) else None


def kind_names() -> list[str]:
    """Every artefact kind the training package declares (imports each training module)."""
    modules = [info.name for info in pkgutil.iter_modules([str(Path(__file__).parent)])]
    return sorted(name for name in modules if _declared_kind(name) is not None)


def artifact_kind(name: str, where: str = "kind") -> ArtifactKind:
    """The kind ``name``, from the training module of that name; ``ConfigError`` listing the choices if none."""
    found = None
    if re.fullmatch(r"[a-z][a-z0-9_]*", name) and importlib.util.find_spec(f"{__package__}.{name}") is not None:
        found = _declared_kind(name)
    if found is None or found.name != name:
        names = kind_names()
        close = difflib.get_close_matches(str(name), names, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(where, f"unknown artefact kind {name!r}", f"{hint}choose one of {', '.join(names)}")
    return found


@dataclass(frozen=True)
class ArtifactRequest:
    """A training config bound to its target and zoo: one artefact to build or reuse."""

    kind: str
    config: Any  # the kind's config (a ``TrainSettings`` dataclass); ``config.target``, if any, is its target
    zoo: Any  # harness.core.zoo_spec.ZooConfig (zoo targets and zoo text depend on it)

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
        raise ConfigError(f"{where}.kind", "missing", f"add kind: one of {', '.join(kind_names())}")
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
        names = request.zoo_references()[0] & set(request.zoo.model_names)
        if not is_built(request.zoo, names):
            build_zoo(request.zoo, log=log, only=names)
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
