"""Checks and preparation on the driver before Ray starts: converted model sources and matching tokenizers."""

from __future__ import annotations

from typing import Any, Callable

from harness.config import Sweep
from harness.errors import ConfigError
from harness.models import ModelSpec, load_tokenizer
from harness.sources import is_converted_source, local_directory
from strategies import parse_params, strategy_class


def prepare_models(sweep: Sweep, log: Callable[[str], None]) -> None:
    """Convert every ``gguf:``/``pkg:`` model of ``sweep`` once, then refuse drafts whose tokenizer differs."""
    for model_id in sorted({spec.id for spec in (*sweep.targets.values(), *sweep.drafts.values())}):
        if is_converted_source(model_id):
            log(f"model {model_id}: {local_directory(model_id, log=log)}")
    check_tokenizers(sweep)


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
        allows_other = getattr(strategy_class(strategy.name), "supports_other_tokenizers", False)
        if allows_other:
            continue
        used = {name for point in strategy.points()
                for name in parse_params(strategy.name, point, f"strategies[{index}]").uses_drafts()}
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
