"""Decoding strategies behind one small interface (see ``strategies.base``), registered by name."""

from strategies.base import ModelSet, Step, Strategy, StrategyParams, Trace
from strategies.registry import available, build, parse_params, register, strategy_class
from strategies.sampling import Sampling

# Built-in strategies register themselves on import.
from strategies import autoregressive, cascade, eagle, hf_peers, lora_routed, prompt_lookup, spadec, speculative  # noqa: E402,F401,E501

__all__ = [
    "ModelSet", "Sampling", "Step", "Strategy", "StrategyParams", "Trace",
    "available", "build", "parse_params", "register", "strategy_class",
]
