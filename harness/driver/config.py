"""Sweep files: YAML -> a validated ``Sweep`` -> ``Cell`` objects with stable, content-hashed ids.

Every problem in a sweep file is reported as one ``ConfigError`` line naming
the field and the fix, before any model is loaded.
"""

from __future__ import annotations

import importlib.util
import itertools
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from harness.core.errors import ConfigError, ErrorCollector, unknown_keys
from harness.core.models import DEVICES, DTYPES, ModelSpec, parse_model_spec
from harness.core.numbers import read_number
from harness.core.paths import content_hash
from harness.core.prompts import PromptSetSpec, parse_prompt_set
from harness.core.yaml_file import read_yaml
from harness.core.zoo_spec import ZooConfig
from harness.driver.overrides import apply_overrides, limit_prompts
from strategies import parse_params, strategy_class
from strategies.batched_engine import batch_problem
from strategies.registry import import_plugin, is_registered
from training.artifacts import for_target, load_train_config

TOP_KEYS = ("name", "description", "plugins", "zoo", "models", "train", "prompts", "strategies", "run")
MODEL_KEYS = ("target", "targets", "drafts", "dtype", "device")
STRATEGY_KEYS = ("name", "params", "grid", "runtime_env")
BASELINE = "autoregressive"
TRAIN_PREFIX = "train:"  # a model the sweep's train section builds (kind: draft)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


PAIRINGS = ("interleaved", "shared")
RUN_GRID_KEYS = ("batch_size",)  # run settings a strategy's params or grid may also set, for its own cells
RUNTIME_ENV_CODE = {"pip", "uv", "conda", "py_modules", "working_dir", "py_executable", "container", "image_uri"}


CELL_START_S = 600.0  # a cell's default time limit: loading its models and warming up
SECONDS_PER_TOKEN = 0.5  # ... plus this per token of its budget
UNCOUNTED_PROMPTS = 256  # the prompts assumed where the driver cannot count them (hf: sets, all of Spec-Bench)


@dataclass(frozen=True)
class RunSettings:
    """How cells are run: generation length, warm-up, seed, temperature, workers and Ray."""

    max_new_tokens: int = 64
    warmup_prompts: int = 2
    seed: int = 0
    temperature: float = 0.0
    workers: int = 1
    num_cpus: int | None = None
    address: str | None = None
    max_prompt_tokens: int | None = None
    max_retries: int = 2
    cache_memory_gb: float | None = None
    pairing: str = "interleaved"  # interleaved: baseline and strategy back to back per turn | shared: one baseline cell
    repeats: int = 1  # time each turn this many times (per side) and keep the median
    drift_tolerance: float = 0.10  # flag a cell when its target's 1-token probe differs more between its sides
    # (and by more than 3 standard errors of the probe's own noise in the cell)
    max_cpu_wait: float = 0.10  # flag a cell when its worker's threads waited for a CPU more than this share of the time
    cell_timeout_s: float | None = None  # a cell running longer fails as timed out (None: scaled to its token budget)
    batch_size: int = 1  # prompts decoded at once (static batches; strategies.batched_engine); a grid may sweep it
    compile: bool = False  # on CUDA: static KV caches and one CUDA graph per forward shape (harness.core.static_lm)

    @property
    def sampled(self) -> bool:
        """Whether decoding samples (then outputs legitimately differ from the baseline's)."""
        return self.temperature > 0


@dataclass(frozen=True)
class StrategySpec:
    """One strategy entry: fixed params plus a grid of lists to sweep over."""

    name: str
    params: dict[str, Any]
    grid: dict[str, list[Any]]
    runtime_env: dict[str, Any] = field(default_factory=dict)

    def points(self) -> list[dict[str, Any]]:
        """Every grid point merged over the fixed params, in a stable order (run settings of ``RUN_GRID_KEYS``
        included; ``split_point`` takes them out)."""
        keys = list(self.grid)
        combos = itertools.product(*(self.grid[key] for key in keys)) if keys else [()]
        return [{**self.params, **dict(zip(keys, combo))} for combo in combos]


def split_point(point: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A grid point as (strategy params, run settings it overrides for its cells)."""
    return ({key: value for key, value in point.items() if key not in RUN_GRID_KEYS},
            {key: value for key, value in point.items() if key in RUN_GRID_KEYS})


@dataclass(frozen=True)
class Cell:
    """One unit of work: a strategy with fixed params on one shard of one prompt set, for one target.

    ``kind`` is ``baseline`` for the autoregressive run that, under ``pairing:
    shared``, every strategy cell on the same (target, shard, generation settings,
    device type) is paired against, and ``strategy`` otherwise; such a strategy cell
    names its baseline in ``baseline_id``. Under ``pairing: interleaved`` there are
    no baseline cells: each strategy cell runs the baseline itself, turn by turn.
    """

    sweep: str
    target: str
    target_spec: ModelSpec
    drafts: dict[str, ModelSpec]
    prompt_set: PromptSetSpec
    shard: int
    strategy: str
    params: dict[str, Any]
    run: RunSettings
    device: str
    kind: str = "strategy"
    baseline_id: str = ""
    runtime_env: dict[str, Any] = field(default_factory=dict)
    plugins: tuple[str, ...] = ()
    artifacts: dict[str, Any] = field(default_factory=dict)  # sweep name -> training.artifacts.ArtifactRequest
    zoo_key: str = ""  # the zoo build's key when a model or prompt set of the cell comes from the zoo
    cell_id: str = ""

    def identity(self) -> dict[str, Any]:
        """The content the cell id is hashed from (what determines its result): the params resolved (defaults
        filled in, so ``{draft: d}`` and ``{draft: d, gamma: 4}`` are one cell), the zoo build, the prompt file's
        content and the plugins' code as well as the settings."""
        identity = {
            "kind": self.kind,
            "target": [self.target, self.target_spec.as_dict()],
            "prompt_set": self.prompt_set.key(),
            "shard": self.shard,
            "strategy": self.strategy,
            "params": parse_params(self.strategy, self.params, self.strategy).as_dict() if self.kind == "strategy"
            else {},
            "generation": {
                "max_new_tokens": self.run.max_new_tokens,
                "warmup_prompts": self.run.warmup_prompts,
                "seed": self.run.seed,
                "temperature": self.run.temperature,
                "max_prompt_tokens": self.run.max_prompt_tokens,
                "pairing": self.run.pairing,
                "repeats": self.run.repeats,
                **({"batch_size": self.run.batch_size} if self.run.batch_size != 1 else {}),  # ids of batch 1 kept
                **({"compile": True} if self.run.compile else {}),  # ids of eager cells kept
            },
            "device": self.device,
        }
        if self.zoo_key:
            identity["zoo"] = self.zoo_key
        if self.plugins:
            identity["plugins"] = [plugin_identity(plugin) for plugin in self.plugins]
        if self.kind == "strategy":
            identity["drafts"] = {name: spec.as_dict() for name, spec in sorted(self.drafts.items())}
            identity["baseline_id"] = self.baseline_id
            if self.artifacts:
                identity["artifacts"] = {name: request.key() for name, request in sorted(self.artifacts.items())}
            if self.runtime_env:
                identity["runtime_env"] = self.runtime_env
        return identity

    def timeout_s(self) -> float:
        """How long the cell may run: ``run.cell_timeout_s``, else 10 minutes for loading and warm-up plus half a
        second per token of its budget (both sides, two turns a prompt, every repeat; 256 prompts when the driver
        cannot count them). Generous on purpose: it catches a cell that hangs, not one that is slow."""
        if self.run.cell_timeout_s is not None:
            return self.run.cell_timeout_s
        prompts = self.prompt_set.count or UNCOUNTED_PROMPTS
        per_shard = -(-prompts // self.prompt_set.shards) + self.run.warmup_prompts
        sides = 2 if self.kind == "strategy" and self.run.pairing == "interleaved" else 1
        return CELL_START_S + SECONDS_PER_TOKEN * sides * 2 * self.run.max_new_tokens * self.run.repeats * per_shard

    @property
    def label(self) -> str:
        params = ",".join(f"{key}={_short(value)}" for key, value in self.params.items())
        where = f"{self.prompt_set.name}[{self.shard}/{self.prompt_set.shards}]"
        name = "baseline" if self.kind == "baseline" else f"{self.strategy}({params})"
        batch = f" at batch {self.run.batch_size}" if self.run.batch_size != 1 else ""
        compiled = " compiled" if self.run.compile else ""
        return f"{name} {where} on {self.target}{batch}{compiled}"


def plugin_identity(plugin: str) -> str:
    """A plugin as it enters cell ids: a .py file by its content, a module by its name."""
    return content_hash(Path(plugin).read_bytes().hex())[:16] if plugin.endswith(".py") else plugin


def _short(value: Any) -> str:
    return str(value).replace(" ", "")


@dataclass(frozen=True)
class Sweep:
    """A validated sweep file."""

    name: str
    path: Path
    zoo: Any  # harness.core.zoo_spec.ZooConfig
    targets: dict[str, ModelSpec]
    drafts: dict[str, ModelSpec]
    device: str
    prompt_sets: tuple[PromptSetSpec, ...]
    strategies: tuple[StrategySpec, ...]
    run: RunSettings
    raw: dict[str, Any] = field(default_factory=dict, compare=False)

    plugins: tuple[str, ...] = ()
    train: dict[str, Any] = field(default_factory=dict)  # name -> training.artifacts.ArtifactRequest
    draft_artifacts: dict[str, Any] = field(default_factory=dict)  # draft name -> its request (``train:<name>`` drafts)

    def cells(self, device_type: str = "cpu") -> list[Cell]:
        """The grid expanded into cells: one baseline per (target, prompt shard) under shared pairing, then the
        strategy cells; a cell given twice (a strategy listed twice, a grid value repeated, params equal once
        defaults are filled in) is kept once (``duplicate_cells`` names them).

        ``device_type`` (``cpu`` or ``cuda``) is where the workers run; it is part
        of every cell id, so results from different device types never pair.
        """
        unique: dict[str, Cell] = {}
        for cell in self._expand(device_type):
            unique.setdefault(cell.cell_id, cell)
        return list(unique.values())

    def duplicate_cells(self, device_type: str = "cpu") -> dict[str, int]:
        """Label -> how many times the sweep file gives that cell, for the cells given more than once."""
        counts: dict[str, int] = {}
        labels: dict[str, str] = {}
        for cell in self._expand(device_type):
            counts[cell.cell_id] = counts.get(cell.cell_id, 0) + 1
            labels.setdefault(cell.cell_id, cell.label)
        return {labels[cell_id]: count for cell_id, count in counts.items() if count > 1}

    def _expand(self, device_type: str) -> list[Cell]:

        cells = []
        zoo_key = self.zoo.key() if self.uses_zoo() else ""
        for target, target_spec in self.targets.items():
            for prompt_set in self.prompt_sets:
                for shard_index in range(prompt_set.shards):
                    baseline = _with_id(Cell(self.name, target, target_spec, {}, prompt_set, shard_index, BASELINE,
                                             {}, self.run, device_type, kind="baseline", plugins=self.plugins,
                                             zoo_key=zoo_key))
                    shared = self.run.pairing == "shared"
                    if shared:
                        cells.append(baseline)
                    for strategy in self.strategies:
                        for point in strategy.points():
                            params, run_settings = split_point(point)
                            checked = parse_params(strategy.name, params, strategy.name)
                            drafts = {name: self.drafts[name] for name in checked.uses_drafts()}
                            artifacts = {name: for_target(self.train[name], target_spec)
                                         for name in checked.uses_artifacts()}
                            artifacts.update({name: for_target(load_train_config(raw, f"{strategy.name}.{name}",
                                                                                 self.path.parent, self.zoo),
                                                               target_spec)
                                              for name, raw in checked.implicit_artifacts().items()})
                            artifacts.update({f"draft:{name}": self.draft_artifacts[name]
                                              for name in drafts if name in self.draft_artifacts})
                            cell = Cell(self.name, target, target_spec, drafts, prompt_set, shard_index,
                                        strategy.name, params, replace(self.run, **run_settings), device_type,
                                        baseline_id=baseline.cell_id if shared else "",
                                        runtime_env=strategy.runtime_env,
                                        plugins=self.plugins, artifacts=artifacts, zoo_key=zoo_key)
                            cells.append(_with_id(cell))
        return cells

    def zoo_models(self) -> tuple[str, ...]:
        """The zoo models the sweep names as targets or drafts (built before the cells run)."""
        names = (spec.zoo_name for spec in (*self.targets.values(), *self.drafts.values()))
        return tuple(dict.fromkeys(name for name in names if name))

    def uses_zoo_models(self) -> bool:
        """Whether a model comes from the zoo (then the zoo must be built before the cells run)."""
        return bool(self.zoo_models())

    def uses_zoo(self) -> bool:
        """Whether a model or a prompt set comes from the zoo (then its build settings are part of every cell id)."""
        return self.uses_zoo_models() or any(prompt_set.kind == "zoo" for prompt_set in self.prompt_sets)


def _with_id(cell: Cell) -> Cell:
    from dataclasses import replace

    return replace(cell, cell_id=content_hash(cell.identity())[:16])


# ---------------------------------------------------------------------------- loading


def load_sweep(path: str | Path, overrides: list[str] | tuple[str, ...] = (), limit: int | None = None,
               allow_plugins: bool = True) -> Sweep:
    """Read and validate the sweep file at ``path``, with ``--set`` ``overrides`` and a ``--limit`` of prompts
    per set applied first (``allow_plugins=False``: refuse a file that names plugins)."""
    path = Path(path)
    raw = read_yaml(path, "sweep file", "sweep YAML file, e.g. configs/quickstart.yaml")
    if overrides or limit is not None:
        raw = _mapping(raw, "sweep file", "the file must be a YAML mapping with name, models, prompts, strategies")
        raw = apply_overrides(raw, list(overrides))
        if limit is not None:
            raw = limit_prompts(raw, limit)
    return parse_sweep(raw, base_dir=path.resolve().parent, path=path, allow_plugins=allow_plugins)


def parse_sweep(raw: Any, base_dir: Path, path: Path | None = None, allow_plugins: bool = True) -> Sweep:
    """Validate a sweep mapping (the parsed YAML), reporting every problem of the file at once.

    The sections are checked independently and their errors gathered; a check
    that depends on a section with errors (a strategy's draft against a broken
    ``models.drafts`` entry) is skipped rather than reported twice. Plugins
    (code the file names) are imported only once everything else is valid, and
    the strategy entries only they can define are checked after that;
    ``allow_plugins=False`` refuses a file that names any, or whose strategies'
    ``runtime_env`` installs or ships code on the workers.
    """

    raw = _mapping(raw, "sweep file", "the file must be a YAML mapping with name, models, prompts, strategies")
    problems = ErrorCollector()
    with problems.check():
        unknown_keys("", raw, TOP_KEYS)
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        problems.add(ConfigError("name", f"expected a sweep name of letters, digits, '_', '-' or '.', got {name!r}",
                                 "add e.g. name: my-sweep"))
    plugins: tuple[str, ...] = ()
    with problems.check():
        plugins = _resolve_plugins(raw.get("plugins", []), base_dir, allow_plugins)
    zoo = ZooConfig()
    with problems.check():
        zoo = ZooConfig.from_dict(_mapping(raw.get("zoo", {}), "zoo", "write zoo overrides as a mapping"))
    train, broken_train = _parse_train(raw.get("train", {}), base_dir, zoo, problems)
    models = _parse_models(raw.get("models"), base_dir, zoo, train, broken_train, problems)
    prompt_sets = _parse_prompt_sets(raw.get("prompts"), base_dir, problems)
    run = RunSettings()
    with problems.check():
        run = _parse_run(raw.get("run", {}))
    if not allow_plugins and isinstance(raw.get("strategies"), list):
        for index, item in enumerate(raw["strategies"]):
            env = item.get("runtime_env") if isinstance(item, dict) else None
            installs = sorted(set(env) & RUNTIME_ENV_CODE) if isinstance(env, dict) else []
            if installs:
                problems.add(ConfigError(f"strategies[{index}].runtime_env", f"installs or ships code on the workers "
                                         f"({', '.join(installs)}) and --no-plugins refuses it",
                                         "drop --no-plugins if you trust the file"))
    deferred: list[tuple[int, Any]] = []  # entries naming no built-in strategy: checked once plugins are imported
    specs = _parse_strategies(raw.get("strategies"), models, train, broken_train, run, problems,
                              deferred if plugins else None)
    problems.raise_if_any()
    if plugins:  # imported only now that the rest of the file is valid
        _import_plugins(plugins, problems)
        problems.raise_if_any()
        for index, item in deferred:
            _add_strategy(specs, index, item, models, train, broken_train, run, problems)
        problems.raise_if_any()
    strategies = tuple(specs[index] for index in sorted(specs))  # in the file's order
    return Sweep(name=name, path=Path(path) if path else base_dir / "<inline>", zoo=zoo, targets=models.targets,
                 drafts=models.drafts, device=models.device, prompt_sets=prompt_sets, strategies=strategies, run=run,
                 raw=raw, plugins=plugins, train=train, draft_artifacts=models.draft_artifacts)


@dataclass
class _Models:
    """The parsed ``models`` section; ``broken_drafts`` names the drafts whose entries had errors."""

    targets: dict[str, ModelSpec] = field(default_factory=dict)
    drafts: dict[str, ModelSpec] = field(default_factory=dict)
    draft_artifacts: dict[str, Any] = field(default_factory=dict)
    device: str = "auto"
    broken_drafts: set[str] = field(default_factory=set)
    parsed: bool = True  # False when the section itself is missing or not a mapping


def _parse_models(raw: Any, base_dir: Path, zoo: ZooConfig, train: dict[str, Any], broken_train: set[str],
                  problems: ErrorCollector) -> _Models:
    """The ``models`` section: every target and draft checked on its own."""
    models = _Models()
    try:
        raw = _mapping(raw, "models", "add models: {target: zoo:target, drafts: {...}}")
    except ConfigError as error:
        problems.add(error)
        models.parsed = False
        return models
    with problems.check():
        unknown_keys("models", raw, MODEL_KEYS)
    dtype = raw.get("dtype", "float32")
    if dtype not in DTYPES:
        problems.add(ConfigError("models.dtype", f"unknown dtype {dtype!r}", f"choose one of {', '.join(DTYPES)}"))
        dtype = "float32"
    models.device = raw.get("device", "auto")
    if models.device not in DEVICES:
        problems.add(ConfigError("models.device", f"unknown device {models.device!r}",
                                 f"choose one of {', '.join(DEVICES)}"))
    if ("target" in raw) == ("targets" in raw):
        problems.add(ConfigError("models.target",
                                 "give exactly one of target (one model) or targets (a name -> model mapping)"))
    else:
        raw_targets: dict[str, Any] = {}
        with problems.check():
            raw_targets = {"target": raw["target"]} if "target" in raw else _mapping(raw["targets"], "models.targets", "")
            if not raw_targets:
                raise ConfigError("models.targets", "no target model", "name at least one")
        for key, value in raw_targets.items():
            with problems.check():
                models.targets[str(key)] = parse_model_spec(value, f"models.targets.{key}", dtype, zoo.model_names,
                                                            base_dir)
    raw_drafts: dict[str, Any] = {}
    with problems.check():
        raw_drafts = _mapping(raw.get("drafts", {}), "models.drafts", "write drafts as a name -> model mapping")
    for key, value in raw_drafts.items():
        where = f"models.drafts.{key}"
        try:
            value, request = _trained_model(value, where, train, broken_train)
            models.drafts[str(key)] = parse_model_spec(value, where, dtype, zoo.model_names, base_dir)
        except _Skipped:
            models.broken_drafts.add(str(key))
            continue
        except ConfigError as error:
            problems.add(error)
            models.broken_drafts.add(str(key))
            continue
        if request is not None:
            models.draft_artifacts[str(key)] = request
    return models


class _Skipped(Exception):
    """A check skipped because what it checks against had its own error (already reported)."""


def _parse_prompt_sets(raw: Any, base_dir: Path, problems: ErrorCollector) -> tuple[PromptSetSpec, ...]:
    """The ``prompts`` section: every prompt set checked on its own, and their names unique."""
    if not isinstance(raw, list) or not raw:
        problems.add(ConfigError("prompts", "expected a non-empty list of prompt sets",
                                 "add e.g. - {name: code, source: zoo:code}"))
        return ()
    prompt_sets = []
    for index, item in enumerate(raw):
        with problems.check():
            prompt_sets.append(parse_prompt_set(item, f"prompts[{index}]", base_dir))
    names = [spec.name for spec in prompt_sets]
    if len(set(names)) != len(names):
        problems.add(ConfigError("prompts[].name", "prompt set names repeat", "give each prompt set its own name"))
    return tuple(prompt_sets)


def _trained_model(raw: Any, where: str, train: dict[str, Any], broken_train: set[str]) -> tuple[Any, Any]:
    """A ``train:<name>`` model (a draft the sweep trains) as its ``artifact:`` id and its request; others unchanged
    (``_Skipped`` when the train entry it names had errors)."""
    model_id = raw.get("id") if isinstance(raw, dict) else raw
    if not isinstance(model_id, str) or not model_id.startswith(TRAIN_PREFIX):
        return raw, None
    name = model_id[len(TRAIN_PREFIX):]
    if name in broken_train:
        raise _Skipped(name)
    request = train.get(name)
    if request is None or request.kind != "draft":
        drafts = [key for key, value in train.items() if value.kind == "draft"]
        raise ConfigError(f"{where}.id", f"{model_id!r} names no draft in the sweep's train section",
                          f"choose one of {', '.join(TRAIN_PREFIX + d for d in drafts) or '(none: add train: {name: <kind: draft config>})'}")
    model_id = request.model_id()
    return ({**raw, "id": model_id} if isinstance(raw, dict) else model_id), request


def _parse_train(raw: Any, base_dir: Path, zoo: ZooConfig, problems: ErrorCollector) -> tuple[dict[str, Any], set[str]]:
    """The sweep's trainable artefacts (name -> a training-config path or inline mapping with ``kind``), each checked
    on its own, and the names of those with errors."""
    try:
        raw = _mapping(raw, "train", "write train as name -> training config path, e.g. {head: train/eagle_zoo.yaml}")
    except ConfigError as error:
        problems.add(error)
        return {}, set()
    train, broken = {}, set()
    for name, value in raw.items():
        try:
            train[str(name)] = load_train_config(value, f"train.{name}", base_dir, zoo)
        except ConfigError as error:
            with problems.check():
                raise error
            broken.add(str(name))
    return train, broken


def _resolve_plugins(raw: Any, base_dir: Path, allow_plugins: bool) -> tuple[str, ...]:
    """The sweep's plugins, not yet imported: a ``.py`` path relative to the sweep file's directory (or absolute),
    or an installed module's dotted name."""
    if not isinstance(raw, list) or not all(isinstance(item, str) for item in raw):
        raise ConfigError("plugins", f"expected a list of module names or .py paths, got {raw!r}")
    if raw and not allow_plugins:
        raise ConfigError("plugins", f"the sweep imports code ({', '.join(raw)}) and --no-plugins refuses it",
                          "drop --no-plugins if you trust the file, or remove its plugins")
    resolved, problems = [], ErrorCollector()
    for index, item in enumerate(raw):
        where = f"plugins[{index}]"
        if item.endswith(".py"):
            path = Path(item).expanduser()
            path = path if path.is_absolute() else base_dir / path
            if not path.is_file():
                problems.add(ConfigError(where, f"plugin file {str(path)!r} not found",
                                         "give a path relative to the sweep file's directory"))
                continue
            resolved.append(str(path.resolve()))
        elif not _installed(item):
            problems.add(ConfigError(where, f"no installed module {item!r}",
                                     "install it, or give a .py path relative to the sweep file"))
        else:
            resolved.append(item)
    problems.raise_if_any()
    return tuple(resolved)


def _installed(module: str) -> bool:
    """Whether ``module`` (a dotted name) can be imported from the installed packages."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _import_plugins(plugins: tuple[str, ...], problems: ErrorCollector) -> None:
    """Import each plugin so its strategies register; any error it raises is one line naming the plugin."""
    for index, plugin in enumerate(plugins):
        try:
            import_plugin(plugin)
        except SyntaxError as error:
            problems.add(ConfigError(f"plugins[{index}]", f"{plugin} line {error.lineno}: syntax error "
                                                          f"({error.msg})", "fix the plugin"))
        except Exception as error:  # a plugin is user code: whatever it raises is a bad input
            problems.add(ConfigError(f"plugins[{index}]", f"importing {plugin} raised {type(error).__name__}: "
                                                          f"{error}", "fix the plugin"))


def _parse_strategies(raw: Any, models: _Models, train: dict[str, Any], broken_train: set[str], run: RunSettings,
                      problems: ErrorCollector, deferred: list[tuple[int, Any]] | None) -> dict[int, StrategySpec]:
    """The ``strategies`` section by entry index: every entry and every grid point checked on its own. With
    ``deferred`` (the sweep has plugins), an entry naming no registered strategy is put there instead, to be checked
    once the plugins are imported."""
    if not isinstance(raw, list) or not raw:
        problems.add(ConfigError("strategies", "expected a non-empty list",
                                 "add e.g. - {name: speculative, grid: {gamma: [2, 4]}}"))
        return {}
    specs: dict[int, StrategySpec] = {}
    for index, item in enumerate(raw):
        if deferred is not None and isinstance(item, dict) and isinstance(item.get("name"), str) \
                and not is_registered(item["name"]):
            deferred.append((index, item))
        else:
            _add_strategy(specs, index, item, models, train, broken_train, run, problems)
    return specs


def _add_strategy(specs: dict[int, StrategySpec], index: int, item: Any, models: _Models, train: dict[str, Any],
                  broken_train: set[str], run: RunSettings, problems: ErrorCollector) -> None:
    """Parse strategy entry ``index`` into ``specs``; its errors go to ``problems``."""
    try:
        specs[index] = _parse_strategy(item, f"strategies[{index}]", models, train, broken_train, run, problems)
    except _Skipped:
        pass
    except ConfigError as error:
        problems.add(error)


def _parse_strategy(item: Any, where: str, models: _Models, train: dict[str, Any], broken_train: set[str],
                    run: RunSettings, problems: ErrorCollector) -> StrategySpec:
    """One strategy entry: its name, params, grid and runtime_env, then each grid point's params and references."""
    item = _mapping(item, where, "write each strategy as {name: ..., params: {...}, grid: {...}}")
    with problems.check():
        unknown_keys(where, item, STRATEGY_KEYS)
    parts: dict[str, Any] = {}
    for key, fix in (("params", "write fixed parameters as a mapping"),
                     ("grid", "write the grid as parameter -> list of values"),
                     ("runtime_env", "write a Ray runtime_env mapping, e.g. {pip: [...], env_vars: {...}}")):
        with problems.check():
            parts[key] = _mapping(item.get(key, {}), f"{where}.{key}", fix)
    name = item.get("name")
    if not isinstance(name, str):
        raise ConfigError(f"{where}.name", "missing strategy name", "run `specsweep list` to see the strategies")
    strategy_class(name, f"{where}.name")
    params, grid, runtime_env = parts.get("params", {}), parts.get("grid", {}), parts.get("runtime_env", {})
    broken = len(parts) < 3
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            problems.add(ConfigError(f"{where}.grid.{key}", f"expected a non-empty list of values, got {values!r}",
                                     "put a single fixed value under params instead"))
            broken = True
        elif key in params:
            problems.add(ConfigError(f"{where}.grid.{key}", "also given under params", "keep it in one of the two"))
            broken = True
    if broken:
        raise _Skipped(where)
    spec = StrategySpec(name=name, params=dict(params), grid={key: list(values) for key, values in grid.items()},
                        runtime_env=dict(runtime_env))
    for point in spec.points():
        with problems.check():
            _check_point(name, point, where, models, train, broken_train, run)
    return spec


def _check_point(name: str, point: dict[str, Any], where: str, models: _Models, train: dict[str, Any],
                 broken_train: set[str], run: RunSettings) -> None:
    """One grid point: its params parse, the drafts and artefacts they name exist (unless those had errors), and
    the strategy can decode at the point's batch size."""
    point, run_settings = split_point(point)
    problems = ErrorCollector()
    batch_size = run.batch_size
    if "batch_size" in run_settings:
        with problems.check():
            batch_size = read_number(run_settings["batch_size"], int, f"{where}.batch_size")
            if batch_size < 1:
                raise ConfigError(f"{where}.batch_size", f"must be >= 1, got {batch_size}")
    with problems.check():
        checked = parse_params(name, point, where)
    problems.raise_if_any()
    if batch_size > 1:
        field_name = f"{where}.batch_size" if "batch_size" in run_settings else "run.batch_size"
        reason = batch_problem(strategy_class(name), checked)
        if reason:
            problems.add(ConfigError(field_name, f"{reason}; it cannot decode at batch size {batch_size}",
                                     "run it at batch size 1 (set batch_size: 1 in its params)"))
        elif run.pairing != "interleaved":
            problems.add(ConfigError("run.pairing", f"batch size {batch_size} needs interleaved pairing",
                                     "set run.pairing: interleaved"))
    for draft in checked.uses_drafts():
        if models.parsed and draft not in models.drafts and draft not in models.broken_drafts:
            field_name = "draft" if hasattr(checked, "draft") else "drafts"
            problems.add(ConfigError(f"{where}.{field_name}", f"draft {draft!r} is not in models.drafts",
                                     f"choose one of {', '.join(models.drafts) or '(none defined: add models.drafts)'}"))
    for artifact in checked.uses_artifacts():
        if artifact not in train and artifact not in broken_train:
            field_name = next((key for key, value in checked.as_dict().items() if value == artifact), "params")
            problems.add(ConfigError(f"{where}.{field_name}", f"artefact {artifact!r} is not in the sweep's train section",
                                     f"choose one of {', '.join(train) or '(none defined: add train: {name: <config>})'}"))
    with problems.check():
        checked.check_sampling(run.temperature, where)
    problems.raise_if_any()


def _parse_run(raw: Any) -> RunSettings:
    """The ``run`` section; every key with a wrong type or an out-of-range value is reported."""
    raw = _mapping(raw, "run", "write run settings as a mapping")
    allowed = RunSettings.__dataclass_fields__
    problems = ErrorCollector()
    with problems.check():
        unknown_keys("run", raw, tuple(allowed))
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in allowed:
            continue
        expected = {"temperature": (int, float), "cache_memory_gb": (int, float), "drift_tolerance": (int, float),
                    "cell_timeout_s": (int, float), "max_cpu_wait": (int, float),
                    "address": (str,), "pairing": (str,)}.get(key, (int,))
        optional = key in ("num_cpus", "address", "max_prompt_tokens", "cache_memory_gb", "cell_timeout_s")
        if value is None and optional:
            values[key] = None
            continue
        if key == "compile":
            if not isinstance(value, bool):
                problems.add(ConfigError("run.compile", f"expected true or false, got {value!r}",
                                         "write compile: true (or leave it out for eager decoding)"))
                continue
            values[key] = value
            continue
        if str in expected:
            if not isinstance(value, str):
                problems.add(ConfigError(f"run.{key}", f"expected a string, got {value!r}"))
                continue
            values[key] = value
            continue
        with problems.check():
            values[key] = read_number(value, float if float in expected else int, f"run.{key}")
    run = RunSettings(**values)
    if run.pairing not in PAIRINGS:
        problems.add(ConfigError("run.pairing", f"unknown pairing {run.pairing!r}", f"use one of {', '.join(PAIRINGS)}"))
    if run.drift_tolerance <= 0:
        problems.add(ConfigError("run.drift_tolerance", f"must be > 0, got {run.drift_tolerance}", "e.g. 0.1 for 10 %"))
    for key, low in (("max_new_tokens", 1), ("warmup_prompts", 0), ("workers", 1), ("max_retries", 0), ("repeats", 1),
                     ("batch_size", 1)):
        if getattr(run, key) < low:
            problems.add(ConfigError(f"run.{key}", f"must be >= {low}, got {getattr(run, key)}"))
    if run.temperature < 0:
        problems.add(ConfigError("run.temperature", f"must be >= 0, got {run.temperature}", "use 0 for greedy decoding"))
    if not 0 < run.max_cpu_wait < 1:
        problems.add(ConfigError("run.max_cpu_wait", f"must be between 0 and 1, got {run.max_cpu_wait}",
                                 "e.g. 0.1: flag a cell whose threads waited for a CPU over 10 % of the time"))
    if run.cell_timeout_s is not None and run.cell_timeout_s <= 0:
        problems.add(ConfigError("run.cell_timeout_s", f"must be > 0, got {run.cell_timeout_s}",
                                 "give seconds, or leave it out for a limit scaled to each cell's token budget"))
    if run.num_cpus is not None and run.num_cpus < 1:
        problems.add(ConfigError("run.num_cpus", f"must be >= 1, got {run.num_cpus}"))
    problems.raise_if_any()
    return run


def _mapping(value: Any, where: str, fix: str) -> dict[str, Any]:
    if value is None:
        raise ConfigError(where, "missing", fix)
    if not isinstance(value, dict):
        raise ConfigError(where, f"expected a mapping, got {type(value).__name__}", fix)
    return value
