"""The worker: a Ray actor pinned to one GPU (or some CPUs) that keeps models loaded and runs cells."""

from __future__ import annotations

import os
from typing import Any

from harness.core.records import CellRecord
from harness.driver.config import Cell
from harness.driver.model_cache import ModelCache
from harness.driver.runner import run_cell
from strategies.registry import import_plugin


class Worker:
    """Runs cells in one process, reusing the models it has loaded. Wrapped with ``ray.remote`` by the scheduler."""

    def __init__(self, zoo_config: Any, device: str, name: str, threads: int | None = None,
                 plugins: tuple[str, ...] = (), cache_bytes: int | None = None, compile: bool = False) -> None:
        import torch


        if threads:
            torch.set_num_threads(threads)
        for plugin in plugins:
            import_plugin(plugin)
        self.name = name
        self.cache = ModelCache(zoo_config, device, max_bytes=cache_bytes, compile=compile)
        if device == "cpu" and self.cache.device.type != "cpu":
            raise RuntimeError(f"worker {name}: asked for a CPU worker but got {self.cache.device}")

    def run(self, cell: Cell, baseline: CellRecord | None = None) -> CellRecord:
        """Run ``cell`` (paired with its ``baseline`` record, for a strategy cell under shared pairing) and return
        its record."""
        record = run_cell(cell, self.cache, worker=self.name, baseline=baseline)
        record.model_loads = dict(self.cache.loads)
        return record

    def describe(self) -> dict[str, Any]:
        """Where this worker runs and what it holds."""
        import platform

        import ray
        import torch

        return {
            "name": self.name,
            "node": ray.get_runtime_context().get_node_id() if ray.is_initialized() else platform.node(),
            "host": platform.node(),
            "pid": os.getpid(),
            "device": str(self.cache.device),
            "threads": torch.get_num_threads(),
            "loads": dict(self.cache.loads),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        }
