"""The strategy interface: every decoding method is a ``Strategy`` that turns a prompt into a ``Trace``.

A strategy is registered by name with a params dataclass (a ``StrategyParams``
subclass) that validates itself; it sees models only through
:class:`harness.core.lm.CausalLM`, gathered in a :class:`ModelSet`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from harness.core.errors import ConfigError, ErrorCollector, unknown_key
from harness.core.lm import CausalLM
from harness.core.metrics import acceptance_rate, mean_accepted
from harness.core.numbers import read_number
from harness.core.records import PromptRecord
from harness.core.tables import ReportView
from strategies.sampling import Sampling


@dataclass
class Step:
    """One verification step: how many tokens were drafted and how many of them the target accepted."""

    drafted: int
    accepted: int


@dataclass
class Trace:
    """What one strategy did on one prompt: its tokens, its steps (drafted and accepted counts), the forward
    statistics of each model it used, its cost in parameter units, and its wall time (set by the runner)."""

    tokens: list[int]
    steps: list[Step]
    forward: dict[str, dict[str, float]] = field(default_factory=dict)
    cost_units: float = 0.0
    wall_s: float = 0.0
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def new_tokens(self) -> int:
        return len(self.tokens)

    @property
    def target_calls(self) -> int:
        return int(self.forward.get("target", {}).get("calls", 0))

    @property
    def drafted(self) -> int:
        return sum(step.drafted for step in self.steps)

    @property
    def accepted(self) -> int:
        return sum(step.accepted for step in self.steps)

    @property
    def tau(self) -> float:
        """τ of this trace (``harness.core.metrics.mean_accepted``)."""
        return mean_accepted(self.new_tokens, len(self.steps))

    @property
    def alpha(self) -> float | None:
        """α of this trace (``harness.core.metrics.acceptance_rate``)."""
        return acceptance_rate(self.accepted, self.drafted)


@dataclass
class ModelSet:
    """The models a strategy may use: the target and the sweep's drafts by name."""

    target: CausalLM
    drafts: dict[str, CausalLM] = field(default_factory=dict)
    tokenizer: Any = None  # the target's tokenizer (routing by text, universal assisted decoding)
    artifacts: dict[str, Any] = field(default_factory=dict)  # trained artefacts by sweep name, loaded
    draft_tokenizers: dict[str, Any] = field(default_factory=dict)  # the drafts' tokenizers by name (hf_assisted)

    def draft(self, name: str) -> CausalLM:
        if name not in self.drafts:
            raise KeyError(f"draft {name!r} is not loaded; loaded: {', '.join(self.drafts) or 'none'}")
        return self.drafts[name]

    def artifact(self, name: str) -> Any:
        """The loaded artefact (e.g. an EAGLE head as a ``CausalLM``) the sweep's ``train`` section names ``name``."""
        if name not in self.artifacts:
            raise KeyError(f"artefact {name!r} is not loaded; loaded: {', '.join(self.artifacts) or 'none'}")
        return self.artifacts[name]

    def all(self) -> dict[str, CausalLM]:
        return {"target": self.target, **{f"draft:{name}": model for name, model in self.drafts.items()}}


@dataclass(frozen=True)
class StrategyParams:
    """Base class of strategy parameters: typed fields, checked by ``from_dict`` and ``validate``.

    ``added_later``: fields added after cells were first recorded; at their defaults they stay out of the cell id.
    """

    added_later: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str) -> "StrategyParams":
        """Build params from a mapping, raising ``ConfigError`` on unknown keys, wrong types or bad values."""
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        problems = ErrorCollector()
        for key in sorted(set(map(str, raw)) - set(fields)):
            problems.add(ConfigError(f"{where}.{key}", "unknown parameter", f"{cls.__name__} takes none")
                         if not fields else unknown_key(where, key, fields, what="parameter"))
        values = {}
        for name, value in raw.items():
            if name in fields:
                with problems.check():
                    values[name] = _coerce(value, hints[name], f"{where}.{name}")
        missing = [name for name, spec in fields.items() if name not in raw and spec.default is dataclasses.MISSING
                   and spec.default_factory is dataclasses.MISSING]
        for name in missing:
            problems.add(ConfigError(f"{where}.{name}", "required parameter is missing", "add it to the grid"))
        params = None
        if not missing:  # the range checks run on what did parse (the rest at their defaults), so all show at once
            params = cls(**values)
            with problems.check():
                params.validate(where)
        problems.raise_if_any()
        return params

    def validate(self, where: str) -> None:
        """Raise every range problem of ``problems`` at once (one ``ConfigError``, or ``ConfigErrors``)."""
        collected = ErrorCollector()
        for problem in self.problems(where):
            collected.add(problem)
        collected.raise_if_any()

    def problems(self, where: str) -> Iterator[ConfigError]:
        """Each value-range problem of these params, as a ``ConfigError`` naming its field. Subclasses extend this."""
        return iter(())

    def check_sampling(self, temperature: float, where: str) -> None:
        """``ConfigError`` when these params cannot decode at ``temperature`` (every method can, unless it says)."""

    def uses_drafts(self) -> list[str]:
        """Names of the sweep drafts these params use (checked against the sweep's ``models.drafts``)."""
        return []

    def implicit_artifacts(self) -> dict[str, dict[str, Any]]:
        """Artefacts the strategy needs that no ``train`` entry names, as inline training configs by name
        (e.g. the MaG bigram table); the sweep builds them per target like the others."""
        return {}

    def uses_artifacts(self) -> list[str]:
        """Names of trained artefacts these params use (checked against the sweep's ``train`` section)."""
        return []

    def as_dict(self) -> dict[str, Any]:
        """The params with defaults filled in (what a cell id hashes), less the ``added_later`` fields that still
        hold their defaults, so cells recorded before such a field existed keep their ids."""
        values = dataclasses.asdict(self)
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name in self.added_later:
            if values[name] == defaults[name]:
                del values[name]
        return values


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check ``value`` against a simple type hint (int, float, bool, str, list/tuple of those, Optional)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError as error:
                errors.append(error)
        raise errors[0]
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(where, f"expected a list, got {value!r}", "write it as a YAML list")
        inner = typing.get_args(hint) or (Any,)
        if origin is tuple and len(inner) == 2 and inner[1] is Ellipsis:
            inner = (inner[0],)
        items = [_coerce(item, inner[0] if len(inner) == 1 else inner[i], f"{where}[{i}]") for i, item in enumerate(value)]
        return tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(where, f"expected a mapping, got {value!r}")
        key_hint, value_hint = typing.get_args(hint) or (Any, Any)
        return {_coerce(k, key_hint, where): _coerce(v, value_hint, f"{where}.{k}") for k, v in value.items()}
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(where, f"expected true or false, got {value!r}")
        return value
    if hint in (int, float):
        return read_number(value, hint, where)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(where, f"expected a string, got {value!r}")
        return value
    return value


class Strategy(ABC):
    """A decoding method. Subclasses set ``Params`` and implement ``generate``."""

    name: ClassVar[str] = ""
    Params: ClassVar[type[StrategyParams]] = StrategyParams
    lossy: ClassVar[bool] = False  # decodes with a modified target (layer skipping): not held to the baseline's tokens
    leaderboard: ClassVar[bool] = True  # False: an instrument (the synthetic oracle), shown in its own section only
    supports_other_tokenizers: ClassVar[bool] = False  # drafts may have another vocabulary (it translates between them)
    # The method's own section of the report, if it has one (a function of the run's ReportView returning markdown
    # lines); methods that share a section name the same function, and the report writes it once.
    report_section: ClassVar[Callable[[ReportView], list[str]] | None] = None

    def __init__(self, params: StrategyParams, models: ModelSet) -> None:
        self.params = params
        self.models = models
        self.prompt_category: str | None = None  # the current prompt's category (set by the runner)

    @abstractmethod
    def generate(self, prompt_ids: list[int], max_new_tokens: int, sampling: Sampling) -> Trace:
        """Generate up to ``max_new_tokens`` tokens after ``prompt_ids`` (stopping at EOS)."""

    def prepare(self, prompts: list[list[int]], max_new_tokens: int) -> None:
        """Untimed work before a timed run on ``prompts`` (one prompt, or a batch's rows); none by default."""

    @classmethod
    def pooled_stats(cls, prompts: list[PromptRecord]) -> dict[str, Any]:
        """This method's own statistics over a group's prompts (pooled from its turns' extras), as report columns;
        none unless the method declares them."""
        return {}

    def cost_units(self, forward: dict[str, dict[str, float]]) -> float:
        """Parameter-count cost (CS Drafting's ``model_parameters`` counter): Σ calls × parameters."""
        return float(sum(stats["calls"] * stats["parameters"] for stats in forward.values()))

    def finish(self, tokens: list[int], steps: list[Step], used: dict[str, CausalLM], max_new_tokens: int,
               **extras: Any) -> Trace:
        """Build the Trace: cut ``tokens`` at EOS and ``max_new_tokens``; gather forward counts of ``used``."""
        tokens = truncate(tokens, max_new_tokens, self.models.target.eos_token_id)
        forward = forward_stats(used)
        return Trace(tokens=tokens, steps=steps, forward=forward, cost_units=self.cost_units(forward), extras=extras)


def forward_stats(used: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Each model's forward counts since its last reset (which this starts afresh), with its parameter count, by
    role; ``used`` holds ``CausalLM``-like models (``reset_stats``, ``num_parameters``)."""
    forward = {}
    for role, model in used.items():
        stats = model.reset_stats().as_dict()
        stats["parameters"] = model.num_parameters
        forward[role] = stats
    return forward


def truncate(tokens: list[int], max_new_tokens: int, eos: frozenset[int]) -> list[int]:
    """``tokens`` up to and including the first EOS, at most ``max_new_tokens`` long."""
    tokens = tokens[:max_new_tokens]
    for index, token in enumerate(tokens):
        if token in eos:
            return tokens[: index + 1]
    return tokens

