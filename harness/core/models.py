"""Model specs (Hugging Face id, local path or ``zoo:<name>``) and loading them into ``CausalLM`` wrappers."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from harness.core.checksums import verify_files
from harness.core.errors import ConfigError, unknown_key
from harness.core.lm import CausalLM
from harness.core.paths import specsweep_home
from harness.core.sources import check_source, is_converted_source, local_directory
from harness.core.zoo_spec import model_path, verify_zoo

DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
ZOO_PREFIX = "zoo:"
ARTIFACT_MANIFEST = "artifact.json"  # in an artefact directory, written last
ARTIFACT_PREFIX = "artifact:"  # artifact:<kind>/<key>, a model trained into the artefact cache (e.g. a draft)


SPEC_KEYS = ("id", "dtype", "revision", "attn_implementation", "device_map", "trust_remote_code", "num_gpus", "layers")
VOCAB_SUBSET_FILE = "vocab_subset.json"  # in a model directory: the draft head's token ids (FR-Spec), see CausalLM


@dataclass(frozen=True)
class ModelSpec:
    """Where a model comes from and how to load it.

    ``layers`` keeps only the first N decoder layers (then the model's own final
    norm and LM head): an early-exit draft of any target that needs no training
    (LayerSkip / Draft & Verify). ``device_map`` (accelerate) spreads a model over
    the ``num_gpus`` GPUs its worker reserves.
    """

    id: str
    dtype: str = "float32"
    revision: str | None = None
    attn_implementation: str | None = None
    device_map: str | None = None
    trust_remote_code: bool = False
    num_gpus: int = 1
    layers: int | None = None

    @property
    def zoo_name(self) -> str | None:
        return self.id[len(ZOO_PREFIX):] if self.id.startswith(ZOO_PREFIX) else None

    def as_dict(self) -> dict[str, Any]:
        """The spec's fields; those still at their defaults beyond id/dtype/revision are left out (stable ids)."""
        values = asdict(self)
        defaults = ModelSpec(self.id)
        return {key: value for key, value in values.items()
                if key in ("id", "dtype", "revision") or value != getattr(defaults, key)}


def parse_model_spec(raw: Any, where: str, default_dtype: str, zoo_names: tuple[str, ...], base_dir: Path) -> ModelSpec:
    """A ``ModelSpec`` from a string or a mapping of ``SPEC_KEYS``; ``ConfigError`` on bad input."""
    if isinstance(raw, str):
        raw = {"id": raw}
    if not isinstance(raw, dict):
        raise ConfigError(where, f"expected a model id string or a mapping, got {raw!r}",
                          "write e.g. zoo:target, pkg:smollm2-135m or {id: meta-llama/Llama-3.2-1B, dtype: bfloat16}")
    unknown = sorted(set(raw) - set(SPEC_KEYS))
    if unknown:
        raise unknown_key(where, unknown[0], SPEC_KEYS)
    model_id = raw.get("id")
    if not isinstance(model_id, str) or not model_id:
        raise ConfigError(f"{where}.id", "missing model id",
                          "give a Hugging Face id, a local path, zoo:<name>, pkg:<name> or gguf:<file>")
    dtype = raw.get("dtype", default_dtype)
    if dtype not in DTYPES:
        raise ConfigError(f"{where}.dtype", f"unknown dtype {dtype!r}", f"choose one of {', '.join(DTYPES)}")
    if model_id.startswith(ZOO_PREFIX):
        name = model_id[len(ZOO_PREFIX):]
        if name not in zoo_names:
            raise ConfigError(f"{where}.id", f"the zoo has no model {name!r}",
                              f"choose one of {', '.join(ZOO_PREFIX + n for n in zoo_names)}")
    elif model_id.startswith(ARTIFACT_PREFIX):
        pass  # a trained draft: the sweep's train section resolves it (harness.driver.config)
    elif is_converted_source(model_id):
        model_id = check_source(model_id, f"{where}.id", base_dir)
    elif _looks_like_path(model_id):
        path = _resolve(model_id, base_dir)
        if not path.exists():
            raise ConfigError(f"{where}.id", f"local model path {model_id!r} does not exist",
                              "fix the path or use a Hugging Face id")
        model_id = str(path)
    values = {"id": model_id, "dtype": dtype}
    for key in ("revision", "attn_implementation", "device_map"):
        value = raw.get(key)
        if value is not None and (not isinstance(value, str) or not value):
            raise ConfigError(f"{where}.{key}", f"expected a string, got {value!r}",
                              {"device_map": "e.g. auto (accelerate spreads the model over the worker's GPUs)",
                               "attn_implementation": "e.g. eager, sdpa or flash_attention_2"}.get(key, ""))
        values[key] = value
    trust = raw.get("trust_remote_code", False)
    if not isinstance(trust, bool):
        raise ConfigError(f"{where}.trust_remote_code", f"expected true or false, got {trust!r}",
                          "set it to true only for a model whose code you trust")
    values["trust_remote_code"] = trust
    for key, low in (("num_gpus", 1), ("layers", 1)):
        value = raw.get(key, ModelSpec.__dataclass_fields__[key].default)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise ConfigError(f"{where}.{key}", f"expected an integer >= {low}, got {value!r}",
                              "layers: keep the first N decoder layers (an early-exit draft)" if key == "layers" else
                              "the GPUs a worker reserves for this model (use with device_map: auto)")
        values[key] = value
    if values["num_gpus"] > 1 and values["device_map"] is None:
        raise ConfigError(f"{where}.num_gpus", f"{values['num_gpus']} GPUs but no device_map",
                          "add device_map: auto so accelerate spreads the model over them")
    return ModelSpec(**values)


def _looks_like_path(model_id: str) -> bool:
    return model_id.startswith(("/", "./", "../", "~")) or Path(model_id).exists()


def _resolve(path: str, base_dir: Path) -> Path:
    candidate = Path(path).expanduser()
    if candidate.is_absolute() or candidate.exists():
        return candidate.resolve()
    return (base_dir / candidate).resolve()


def pretrained_location(spec: ModelSpec, zoo_config) -> str:
    """What to pass to ``from_pretrained`` for ``spec``: a zoo, converted or artefact directory, a path or a hub id."""
    if spec.zoo_name is not None:
        import platform


        path = model_path(zoo_config, spec.zoo_name)
        if not (path / "config.json").exists():
            raise FileNotFoundError(
                f"zoo model {spec.zoo_name!r} is not built at {path} on node {platform.node()}: on a multi-node "
                "cluster put $SPECSWEEP_HOME on a shared filesystem, or run `specsweep zoo build` on every node")
        verify_zoo(zoo_config, spec.zoo_name)
        return str(path)
    if spec.id.startswith(ARTIFACT_PREFIX):
        return str(artifact_model_dir(spec.id))
    if is_converted_source(spec.id):
        return str(local_directory(spec.id))
    return spec.id


def artifact_model_dir(model_id: str) -> Path:
    """The model directory of an ``artifact:<kind>/<key>`` id (a trained draft)."""
    path = specsweep_home() / "artifacts" / model_id[len(ARTIFACT_PREFIX):] / "model"
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"trained model {model_id} is not built at {path}: run the sweep (it trains it) "
                                "or `specsweep train draft CONFIG`")
    verify_artifact(path.parent, under="model/")
    return path


def verify_artifact(directory: Path, under: str = "") -> None:
    """``CorruptCache`` when a file of the trained artefact in ``directory`` (those under ``under``, if given)
    differs from the checksums its manifest recorded."""
    manifest = json.loads((directory / ARTIFACT_MANIFEST).read_text())
    verify_files(directory, manifest, f"trained artefact {directory.parent.name}/{directory.name}",
                 f"delete {directory}: the next sweep that uses it retrains it (or `specsweep train "
                 f"{directory.parent.name} CONFIG --force`)", under=under)


def pick_device(requested: str):
    """The torch device for ``requested`` (``auto`` takes CUDA when present); errors if CUDA is asked for but absent."""
    import torch

    if requested == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("models.device", "cuda requested but no GPU is visible to this worker",
                              "use device: auto or cpu")
        return torch.device("cuda:0")
    return torch.device("cpu")


def load_model(spec: ModelSpec, zoo_config, device, name: str):
    """Load ``spec`` onto ``device`` (or across GPUs with its ``device_map``) as a ``CausalLM`` named ``name``."""
    import json

    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging


    hf_logging.disable_progress_bar()
    location = pretrained_location(spec, zoo_config)
    options = {"revision": spec.revision, "dtype": getattr(torch, spec.dtype), "trust_remote_code": spec.trust_remote_code}
    if spec.attn_implementation:
        options["attn_implementation"] = spec.attn_implementation
    if spec.device_map:
        options["device_map"] = spec.device_map
    model = AutoModelForCausalLM.from_pretrained(location, **options)
    if not spec.device_map:
        model = model.to(device)
    if spec.layers is not None:
        keep_first_layers(model, spec.layers)
    subset_file = Path(location) / VOCAB_SUBSET_FILE
    subset = json.loads(subset_file.read_text()) if subset_file.is_file() else None
    return CausalLM(model, name=name, vocab_subset=subset)


def keep_first_layers(model, count: int) -> None:
    """Cut a causal LM to its first ``count`` decoder layers, keeping its final norm and LM head (early exit)."""
    base = model.get_decoder()
    total = len(base.layers)
    if count > total:
        raise ValueError(f"layers: {count} asked for, but the model has only {total} decoder layers")
    base.layers = base.layers[:count]
    model.config.num_hidden_layers = count
    layer_types = getattr(model.config, "layer_types", None)
    if isinstance(layer_types, list):
        model.config.layer_types = layer_types[:count]


def load_tokenizer(spec: ModelSpec, zoo_config):
    """The tokenizer that belongs to ``spec``."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(pretrained_location(spec, zoo_config), revision=spec.revision,
                                         trust_remote_code=spec.trust_remote_code)
