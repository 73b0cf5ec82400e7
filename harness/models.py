"""Model specs (Hugging Face id, local path or ``zoo:<name>``) and loading them into ``CausalLM`` wrappers."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from harness.errors import ConfigError

DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
ZOO_PREFIX = "zoo:"


@dataclass(frozen=True)
class ModelSpec:
    """Where a model comes from and how to load it."""

    id: str
    dtype: str = "float32"
    revision: str | None = None

    @property
    def zoo_name(self) -> str | None:
        return self.id[len(ZOO_PREFIX):] if self.id.startswith(ZOO_PREFIX) else None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_model_spec(raw: Any, where: str, default_dtype: str, zoo_names: tuple[str, ...], base_dir: Path) -> ModelSpec:
    """A ``ModelSpec`` from a string or a ``{id, dtype, revision}`` mapping; ``ConfigError`` on bad input."""
    if isinstance(raw, str):
        raw = {"id": raw}
    if not isinstance(raw, dict):
        raise ConfigError(where, f"expected a model id string or a mapping, got {raw!r}",
                          "write e.g. zoo:target or {id: meta-llama/Llama-3.2-1B, dtype: bfloat16}")
    unknown = sorted(set(raw) - {"id", "dtype", "revision"})
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}", "unknown key", "allowed: id, dtype, revision")
    model_id = raw.get("id")
    if not isinstance(model_id, str) or not model_id:
        raise ConfigError(f"{where}.id", "missing model id", "give a Hugging Face id, a local path or zoo:<name>")
    dtype = raw.get("dtype", default_dtype)
    if dtype not in DTYPES:
        raise ConfigError(f"{where}.dtype", f"unknown dtype {dtype!r}", f"choose one of {', '.join(DTYPES)}")
    if model_id.startswith(ZOO_PREFIX):
        name = model_id[len(ZOO_PREFIX):]
        if name not in zoo_names:
            raise ConfigError(f"{where}.id", f"the zoo has no model {name!r}",
                              f"choose one of {', '.join(ZOO_PREFIX + n for n in zoo_names)}")
    elif _looks_like_path(model_id):
        path = _resolve(model_id, base_dir)
        if not path.exists():
            raise ConfigError(f"{where}.id", f"local model path {model_id!r} does not exist",
                              "fix the path or use a Hugging Face id")
        model_id = str(path)
    revision = raw.get("revision")
    if revision is not None and not isinstance(revision, str):
        raise ConfigError(f"{where}.revision", f"expected a string, got {revision!r}")
    return ModelSpec(id=model_id, dtype=dtype, revision=revision)


def _looks_like_path(model_id: str) -> bool:
    return model_id.startswith(("/", "./", "../", "~")) or Path(model_id).exists()


def _resolve(path: str, base_dir: Path) -> Path:
    candidate = Path(path).expanduser()
    if candidate.is_absolute() or candidate.exists():
        return candidate.resolve()
    return (base_dir / candidate).resolve()


def pretrained_location(spec: ModelSpec, zoo_config) -> str:
    """What to pass to ``from_pretrained`` for ``spec`` (a zoo directory, a path or a hub id)."""
    if spec.zoo_name is not None:
        import platform

        from training.zoo import model_path

        path = model_path(zoo_config, spec.zoo_name)
        if not (path / "config.json").exists():
            raise FileNotFoundError(
                f"zoo model {spec.zoo_name!r} is not built at {path} on node {platform.node()}: on a multi-node "
                "cluster put $SPECSWEEP_HOME on a shared filesystem, or run `specsweep zoo build` on every node")
        return str(path)
    return spec.id


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
    """Load ``spec`` onto ``device`` as a ``CausalLM`` named ``name``."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from harness.lm import CausalLM

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(
        pretrained_location(spec, zoo_config),
        revision=spec.revision,
        dtype=getattr(torch, spec.dtype),
    ).to(device)
    return CausalLM(model, name=name)


def load_tokenizer(spec: ModelSpec, zoo_config):
    """The tokenizer that belongs to ``spec``."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(pretrained_location(spec, zoo_config), revision=spec.revision)
