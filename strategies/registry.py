"""Strategies registered by name, as lm-evaluation-harness registers tasks and models: lazily.

A built-in method is one module of ``strategies.methods`` whose classes register themselves with ``@register``.
Nothing is imported until a name is looked up: ``eagle2`` imports ``strategies/methods/eagle2.py`` if there is one,
and otherwise every method module once, so a module may register several names (``eagle`` and ``eagle2``).
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import importlib
import importlib.util
import pkgutil
import sys
from typing import Any, Callable, TypeVar

from harness.core.errors import ConfigError
from strategies import methods
from strategies.base import ModelSet, Strategy, StrategyParams

_REGISTRY: dict[str, type[Strategy]] = {}

S = TypeVar("S", bound=type[Strategy])


def register(name: str) -> Callable[[S], S]:
    """Class decorator: make a ``Strategy`` subclass available under ``name``."""
    def decorate(cls: S) -> S:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"strategy {name!r} is registered twice ({_REGISTRY[name].__module__}, {cls.__module__})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def import_plugin(name: str) -> None:
    """Import a plugin module (a dotted name or a ``.py`` path) whose strategies register themselves."""
    if name.endswith(".py"):
        module_name = f"specsweep_plugin_{hashlib.sha1(name.encode()).hexdigest()[:12]}"
        if module_name in sys.modules:
            return
        spec = importlib.util.spec_from_file_location(module_name, name)
        if spec is None or spec.loader is None:
            raise ImportError(f"not a Python file: {name}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[module_name]  # a failed import is not cached: the next attempt raises again
            raise
    else:
        importlib.import_module(name)


@functools.cache
def _method_modules() -> frozenset[str]:
    return frozenset(info.name for info in pkgutil.iter_modules(methods.__path__))


@functools.cache
def _import_all_methods() -> None:
    """Import every method module (once per process)."""
    for module in sorted(_method_modules()):
        importlib.import_module(f"{methods.__name__}.{module}")


def _lookup(name: str) -> type[Strategy] | None:
    """The class registered as ``name``, importing its method module on first use."""
    if name not in _REGISTRY and isinstance(name, str):
        if name in _method_modules():
            importlib.import_module(f"{methods.__name__}.{name}")
        if name not in _REGISTRY:
            _import_all_methods()
    return _REGISTRY.get(name)


def is_registered(name: str) -> bool:
    """Whether a strategy is registered as ``name`` (a built-in method or an imported plugin)."""
    return _lookup(name) is not None


def available() -> dict[str, type[Strategy]]:
    """Every registered strategy by name, sorted (imports every built-in method)."""
    _import_all_methods()
    return dict(sorted(_REGISTRY.items()))


def strategy_class(name: str, where: str = "strategies[].name") -> type[Strategy]:
    """The class registered as ``name``; ``ConfigError`` listing the choices if there is none."""
    if _lookup(name) is None:
        close = difflib.get_close_matches(str(name), sorted(_REGISTRY), n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(where, f"unknown strategy {name!r}", f"{hint}choose one of {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def parse_params(name: str, raw: dict[str, Any], where: str) -> StrategyParams:
    """Validated params for strategy ``name`` from a mapping."""
    return strategy_class(name).Params.from_dict(raw, where)


def build(name: str, params: StrategyParams | dict[str, Any], models: ModelSet) -> Strategy:
    """An instance of strategy ``name`` over ``models``."""
    cls = strategy_class(name)
    if isinstance(params, dict):
        params = cls.Params.from_dict(params, f"strategy {name}")
    return cls(params, models)
