"""Cell records: the typed result of one cell, as the worker returns it and as ``cells.jsonl`` stores it.

A ``CellRecord`` holds the cell's identity, its status, the environment it ran
in and, per prompt and turn, the baseline's and the strategy's traces
(``SideRecord``) paired with whether their tokens match. It is written as one
JSON line carrying ``schema`` (``SCHEMA_VERSION``) and read back into the same
type by ``CellRecord.from_json``, which refuses a record of a newer schema or
one whose fields have the wrong shape. Records written before the field
existed (schema 1) have the same shape and read as they are.

The builders (``SideRecord.of``, ``paired_turn``) are pure functions of a
decoding trace (any object with a ``strategies.base.Trace``'s fields), so the
runner and the adaptive-drafts loop write the same records and
``harness.core.metrics`` reads them the same way.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from harness.core.divergence import Divergence

SCHEMA_VERSION = 4  # 1: records written before ``schema`` was stored (same fields); 3 adds TurnRecord.divergence;
# 4 drops SideRecord.tau and .alpha, which nothing read (harness.core.metrics derives both; older records still read)


class RecordError(ValueError):
    """A stored record that cannot be read back: a newer schema, or a field of the wrong shape."""


@dataclass
class SideRecord:
    """One side (baseline or strategy) of one turn: what it generated and how, as ``strategies.base.Trace`` holds it."""

    new_tokens: int = 0
    wall_s: float = 0.0
    target_calls: int = 0
    steps: int = 0
    step_counts: list[list[int]] = field(default_factory=list)  # [drafted, accepted] per verification step
    drafted: int = 0
    accepted: int = 0
    cost_units: float = 0.0
    forward: dict[str, dict[str, float]] = field(default_factory=dict)  # role -> harness.core.lm.ForwardStats fields
    tokens: list[int] = field(default_factory=list)
    probe_s: float | None = None  # the target's 1-token forward timed after the run (the drift guard)
    extras: dict[str, Any] = field(default_factory=dict)  # strategy-specific (tree, levels, arm, wall_runs, ...)

    @classmethod
    def of(cls, trace: Any) -> "SideRecord":
        """The record of a decoding trace."""
        return cls(new_tokens=trace.new_tokens, wall_s=trace.wall_s, target_calls=trace.target_calls,
                   steps=len(trace.steps), step_counts=[[step.drafted, step.accepted] for step in trace.steps],
                   drafted=trace.drafted, accepted=trace.accepted,
                   cost_units=trace.cost_units, forward=trace.forward, tokens=list(trace.tokens),
                   probe_s=trace.extras.get("probe_s"),
                   extras={key: value for key, value in trace.extras.items() if key != "probe_s"})

    @property
    def is_tree(self) -> bool:
        """Whether the strategy verified trees (then α counts every verified node, and chain metrics do not apply)."""
        return bool(self.extras.get("tree"))


@dataclass
class TurnRecord:
    """One turn of one prompt: its prompt tokens, the baseline's side and (in a strategy cell) the strategy's."""

    baseline: SideRecord
    prompt_tokens: int = 0
    prompt_ids: list[int] = field(default_factory=list)  # (not stored by baseline cells of schema 1)
    strategy: SideRecord | None = None
    tokens_match: bool | None = None
    first_divergence: int | None = None
    answer: str | None = None  # the baseline's decoded answer (baseline cells: later turns replay it)
    first: str | None = None  # interleaved pairing: which side ran first ("alternating" over repeats)
    divergence: Divergence | None = None  # greedy, dtype other than float32: the first divergence, tie or real


@dataclass
class PromptRecord:
    """Every turn of one prompt."""

    prompt_id: str
    category: str | None
    turns: list[TurnRecord] = field(default_factory=list)

    @classmethod
    def from_json(cls, data: Any) -> "PromptRecord":
        """The prompt record stored as ``data``; ``RecordError`` naming the field when it has the wrong shape."""
        return _build(cls, data, "prompt")


@dataclass
class Environment:
    """Where a cell ran: device, dtype, library versions, host, threads, seed and parameter counts by role."""

    device: str = ""
    device_name: str = ""
    dtype: str = ""
    torch: str = ""
    transformers: str = ""
    python: str = ""
    host: str = ""
    threads: int = 0
    seed: int = 0
    parameters: dict[str, int] = field(default_factory=dict)


@dataclass
class CellRecord:
    """The result of one cell (see the module docstring); ``cell`` is the identity its id is hashed from."""

    cell_id: str
    kind: str  # baseline | strategy
    label: str
    cell: dict[str, Any]  # harness.driver.config.Cell.identity()
    status: str = "failed"  # ok | failed (a record is failed until its cell finished)
    worker: str | None = None
    started: float | None = None
    seconds: float | None = None
    error: str | None = None
    traceback: str | None = None
    env: Environment | None = None
    template: str | None = None
    paired_with: dict[str, Any] = field(default_factory=dict)
    prompts: list[PromptRecord] = field(default_factory=list)
    timing: dict[str, Any] = field(default_factory=dict)  # harness.core.metrics.timing_check, plus its tolerance
    model_loads: dict[str, int] = field(default_factory=dict)
    commit: str | None = None
    schema: int = SCHEMA_VERSION

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def target_name(self) -> str:
        return self.cell["target"][0]

    @property
    def target_spec(self) -> dict[str, Any]:
        return self.cell["target"][1]

    @property
    def strategy(self) -> str:
        return self.cell["strategy"]

    @property
    def params(self) -> dict[str, Any]:
        return self.cell.get("params", {})

    @property
    def prompt_set(self) -> str:
        return self.cell["prompt_set"]["name"]

    @property
    def prompt_source(self) -> str:
        return self.cell["prompt_set"].get("source", "")

    @property
    def generation(self) -> dict[str, Any]:
        return self.cell.get("generation", {})

    @property
    def sampled(self) -> bool:
        """Whether the cell sampled (temperature > 0), so outputs may legitimately differ from the baseline's."""
        return float(self.generation.get("temperature", 0.0)) > 0

    @property
    def device_name(self) -> str:
        return self.env.device_name if self.env else ""

    @property
    def timing_suspect(self) -> bool:
        return bool(self.timing.get("timing_suspect"))

    def to_json(self) -> dict[str, Any]:
        """The record as a JSON-ready mapping (with ``schema``)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> "CellRecord":
        """The record stored as ``data``; ``RecordError`` naming the field when it cannot be read back."""
        if not isinstance(data, dict):
            raise RecordError(f"expected a JSON object, got {type(data).__name__}")
        schema = data.get("schema", 1)
        if not isinstance(schema, int) or schema > SCHEMA_VERSION:
            raise RecordError(f"schema {schema!r} is newer than this specsweep reads ({SCHEMA_VERSION}); "
                              "upgrade specsweep to read it")
        record = _build(cls, data, "record")
        record.schema = SCHEMA_VERSION
        return record


def _build(kind: Any, value: Any, where: str) -> Any:
    """``value`` (parsed JSON) as an instance of the type ``kind``; ``RecordError`` naming ``where`` otherwise."""
    origin = typing.get_origin(kind)
    if kind is Any:
        return value
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            raise RecordError(f"{where}: expected an object, got {type(value).__name__}")
        hints = typing.get_type_hints(kind)
        values = {}
        for spec in dataclasses.fields(kind):
            if spec.name in value:
                values[spec.name] = _build(hints[spec.name], value[spec.name], f"{where}.{spec.name}")
            elif spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
                raise RecordError(f"{where}.{spec.name}: missing")
        return kind(**values)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _build(option, value, where)
            except RecordError as error:
                errors.append(str(error))
        raise RecordError(errors[0] if errors else f"{where}: unexpected null")
    if origin is list:
        if not isinstance(value, list):
            raise RecordError(f"{where}: expected a list, got {type(value).__name__}")
        (item,) = typing.get_args(kind)
        return [_build(item, element, f"{where}[{index}]") for index, element in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise RecordError(f"{where}: expected an object, got {type(value).__name__}")
        _, item = typing.get_args(kind)
        return {key: _build(item, element, f"{where}.{key}") for key, element in value.items()}
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecordError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecordError(f"{where}: expected an integer, got {value!r}")
        return value
    if kind in (str, bool):
        if not isinstance(value, kind):
            raise RecordError(f"{where}: expected {kind.__name__}, got {value!r}")
        return value
    raise RecordError(f"{where}: unsupported field type {kind!r}")


def match_fields(baseline: list[int], strategy: list[int]) -> tuple[bool, int | None]:
    """Whether two token lists are equal and, if not, the first position where they differ."""
    divergence = next((i for i, (a, b) in enumerate(zip(baseline, strategy)) if a != b), None)
    if divergence is None and len(baseline) != len(strategy):
        divergence = min(len(baseline), len(strategy))
    return divergence is None, divergence


def paired_turn(ids: list[int], baseline: SideRecord, trace: Any, first: str | None = None) -> TurnRecord:
    """One turn's record: its prompt, the baseline's side beside the strategy's trace, and whether they match."""
    strategy = SideRecord.of(trace)
    tokens_match, divergence = match_fields(baseline.tokens, strategy.tokens)
    return TurnRecord(prompt_ids=list(ids), prompt_tokens=len(ids), baseline=baseline, strategy=strategy,
                      tokens_match=tokens_match, first_divergence=divergence, first=first)
