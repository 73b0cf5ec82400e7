"""Decoding strategies behind one small interface (see ``strategies.base``), registered by name.

The methods live in ``strategies.methods``, one module each, imported when a sweep first names them; the rest of
this package is what they share: the decode loop (``engine``), verification, sampling and the registry.
"""

from strategies.base import ModelSet, Step, Strategy, StrategyParams, Trace
from strategies.registry import available, build, parse_params, register, strategy_class
from strategies.sampling import Sampling

__all__ = [
    "ModelSet", "Sampling", "Step", "Strategy", "StrategyParams", "Trace",
    "available", "build", "parse_params", "register", "strategy_class",
]
