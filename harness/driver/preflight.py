"""Checks and preparation on the driver before Ray starts: converted model sources and matching tokenizers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from harness.core.errors import ConfigError
from harness.core.models import ARTIFACT_PREFIX, ModelSpec, load_tokenizer
from harness.core.sources import is_converted, is_converted_source, local_directory
from harness.core.zoo_spec import ZOO_CONTEXT
from harness.driver.config import Sweep, split_point
from harness.driver.hub_probe import check_hub
from strategies import parse_params, strategy_class


def prepare_models(sweep: Sweep, log: Callable[[str], None]) -> None:
    """Convert every ``gguf:``/``pkg:`` model of ``sweep`` once, then refuse drafts whose tokenizer differs."""
    for model_id in sorted({spec.id for spec in (*sweep.targets.values(), *sweep.drafts.values())}):
        if is_converted_source(model_id):
            log(f"model {model_id}: {local_directory(model_id, log=log)}")
    check_tokenizers(sweep)


def check_before_start(sweep: Sweep, address: str | None) -> None:
    """The checks that need no model weights, run before the run directory or Ray exists: hub models and datasets
    that are neither cached nor reachable, a CUDA device where there is none, and generation lengths that do not
    fit a model's context (read from its ``config.json``, or the zoo's settings; a hub model not in the local cache
    is left to the workers)."""
    import torch  # lazy: torch, only once a sweep is run

    check_hub(sweep)
    if sweep.device == "cuda" and not address and not torch.cuda.is_available():
        raise ConfigError("models.device", "cuda requested but this machine has no GPU",
                          "use device: auto or cpu, or join a GPU cluster with --address")
    needed = sweep.run.max_new_tokens + PROMPT_ROOM + 1
    for role, specs in (("targets", sweep.targets), ("drafts", sweep.drafts)):
        for name, spec in specs.items():
            context = context_length(spec)
            if context is not None and needed > context:
                raise ConfigError("run.max_new_tokens", f"{sweep.run.max_new_tokens} new tokens do not fit "
                                  f"models.{role}.{name}'s {context}-token context with room for a prompt",
                                  f"use at most {context - PROMPT_ROOM - 1}")


PROMPT_ROOM = 8  # tokens the runner keeps free besides max_new_tokens (see harness.driver.runner.prompt_limit)


def context_length(spec: ModelSpec) -> int | None:
    """The model's ``max_position_embeddings`` from its config alone, or None when it cannot be read here."""
    if spec.zoo_name is not None:
        return ZOO_CONTEXT
    if spec.id.startswith(ARTIFACT_PREFIX):
        return None  # a trained draft: its config exists only once trained
    directory = Path(spec.id).expanduser()
    if is_converted_source(spec.id):
        if not is_converted(spec.id):
            return None
        directory = Path(local_directory(spec.id, log=lambda message: None))
    config = directory / "config.json"
    if not config.is_file():
        return None
    try:
        value = json.loads(config.read_text()).get("max_position_embeddings")
    except (ValueError, OSError):
        return None
    return value if isinstance(value, int) and value > 0 else None


def check_tokenizers(sweep: Sweep) -> None:
    """``ConfigError`` for a draft whose vocabulary differs from a target's, unless every strategy using it allows that.

    Vocabularies are compared token by token (``get_vocab()``), not by size. A
    draft the sweep trains is checked through the target it is distilled from.
    """
    vocabularies: dict[tuple, dict[str, int]] = {}

    def vocabulary(spec: ModelSpec, where: str) -> dict[str, int]:
        key = (spec.id, spec.revision)
        if key not in vocabularies:
            try:
                vocabularies[key] = load_tokenizer(spec, sweep.zoo).get_vocab()
            except (OSError, ValueError) as error:
                raise ConfigError(where, f"cannot load the tokenizer of {spec.id} ({type(error).__name__}: "
                                  f"{str(error).splitlines()[0] if str(error) else ''})",
                                  "check the model id, path or revision") from None
        return vocabularies[key]

    for index, strategy in enumerate(sweep.strategies):
        allows_other = strategy_class(strategy.name).supports_other_tokenizers
        if allows_other:
            continue
        used = {name for point in strategy.points()
                for name in parse_params(strategy.name, split_point(point)[0], f"strategies[{index}]").uses_drafts()}
        for draft_name in sorted(used):
            draft_spec = _tokenizer_source(sweep, draft_name)
            draft_vocab = vocabulary(draft_spec, f"models.drafts.{draft_name}")
            for target_name, target_spec in sweep.targets.items():
                if draft_vocab != vocabulary(target_spec, f"models.targets.{target_name}"):
                    raise ConfigError(
                        f"models.drafts.{draft_name}",
                        f"its tokenizer differs from target {target_name!r}'s ({_difference(draft_vocab, vocabulary(target_spec, ''))}), "
                        f"and strategy {strategy.name!r} needs a shared vocabulary",
                        "use a draft with the target's tokenizer (e.g. train one: specsweep train draft), "
                        "or hf_assisted, which supports different tokenizers")


def _tokenizer_source(sweep: Sweep, draft_name: str) -> ModelSpec:
    request = sweep.draft_artifacts.get(draft_name)
    return request.config.target if request is not None else sweep.drafts[draft_name]


def _difference(a: dict[str, Any], b: dict[str, Any]) -> str:
    if len(a) != len(b):
        return f"{len(a)} tokens against {len(b)}"
    token = next(token for token in sorted(set(a) | set(b)) if a.get(token) != b.get(token))
    return f"both have {len(a)} tokens, but {token!r} is {a.get(token)} against {b.get(token)}"
