"""The generic training launcher: a training loop on Ray Train workers (``TorchTrainer``) with DeepSpeed.

Every trainable artefact (EAGLE heads now; adapters, the router and SpaDec's
predictor later) hands :func:`launch` a loop function and its config. The
loop runs on ``num_workers`` Ray Train workers (one GPU each when the cluster
has GPUs, else CPU with the gloo backend); inside it, :func:`deepspeed_engine`
wraps the model and a ``torch.optim`` optimizer with the DeepSpeed config from
``configs/train/`` (ZeRO stage set per job, bf16 on GPU, fp32 on CPU), and
:func:`report_files` hands rank 0's output files back as a Ray Train
checkpoint, which the launcher copies into the artefact directory.

A job whose ``launch.checkpoint_every`` is set saves DeepSpeed checkpoints in
:func:`resume_dir` (beside the artefact's directory and named after it, so
after the artefact's key); launched again after an interruption, it continues
from the newest one. The directory is removed once the artefact is written.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from harness.core.errors import ConfigError, unknown_key
from harness.core.local_ray import start_local_ray
from harness.core.paths import specsweep_home


@dataclass(frozen=True)
class LaunchSettings:
    """Where and how a training job runs: Ray Train workers, their resources, and the DeepSpeed config."""

    num_workers: int = 1
    use_gpu: str = "auto"  # auto | true | false
    cpus_per_worker: int = 1
    deepspeed_config: str = ""  # a DeepSpeed JSON file; empty = the built-in ZeRO config below
    zero_stage: int = 1
    checkpoint_every: int = 0  # save a resumable DeepSpeed checkpoint every N steps (0: never)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str, base_dir: Path) -> "LaunchSettings":
        """Validated settings from the ``launch`` mapping of a training config."""
        allowed = cls.__dataclass_fields__
        unknown = sorted(set(raw) - set(allowed))
        if unknown:
            raise unknown_key(where, unknown[0], allowed)
        values = dict(raw)
        if isinstance(values.get("use_gpu"), bool):
            values["use_gpu"] = "true" if values["use_gpu"] else "false"
        settings = cls(**values)
        for name, low in (("num_workers", 1), ("cpus_per_worker", 1), ("checkpoint_every", 0)):
            value = getattr(settings, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{where}.{name}", f"expected an integer >= {low}, got {value!r}")
        if settings.use_gpu not in ("auto", "true", "false"):
            raise ConfigError(f"{where}.use_gpu", f"expected auto, true or false, got {settings.use_gpu!r}")
        if settings.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"{where}.zero_stage", f"expected 0, 1, 2 or 3, got {settings.zero_stage!r}")
        if settings.deepspeed_config:
            path = Path(settings.deepspeed_config).expanduser()
            path = path if path.is_absolute() else (base_dir / path)
            if not path.is_file():
                raise ConfigError(f"{where}.deepspeed_config", f"{settings.deepspeed_config} not found",
                                  "give the path of a DeepSpeed JSON file (relative to the training config)")
            settings = LaunchSettings(**{**settings.__dict__, "deepspeed_config": str(path.resolve())})
        return settings

    def cpu_demand(self) -> int:
        """CPUs the job's workers reserve on the cluster."""
        return self.num_workers * self.cpus_per_worker


DEFAULT_DEEPSPEED = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": 1,
    "gradient_clipping": "auto",
    "zero_optimization": {"stage": "auto"},
    "bf16": {"enabled": "auto"},
    "steps_per_print": 1_000_000,
    "wall_clock_breakdown": False,
}


def deepspeed_settings(settings: LaunchSettings, micro_batch: int, grad_clip: float, gpu: bool) -> dict[str, Any]:
    """The DeepSpeed config for one job: the file's (or the default's) ``"auto"`` values filled in."""
    config = json.loads(Path(settings.deepspeed_config).read_text()) if settings.deepspeed_config else \
        json.loads(json.dumps(DEFAULT_DEEPSPEED))
    if config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        config["train_micro_batch_size_per_gpu"] = micro_batch
    if config.get("gradient_clipping", "auto") == "auto":
        config["gradient_clipping"] = grad_clip
    zero = config.setdefault("zero_optimization", {})
    if zero.get("stage", "auto") == "auto":
        zero["stage"] = settings.zero_stage
    bf16 = config.setdefault("bf16", {})
    if bf16.get("enabled", "auto") == "auto":
        bf16["enabled"] = gpu  # bf16 on GPU; fp32 on CPU (DeepSpeed refuses fp16 there)
    config.pop("train_batch_size", None)
    return config


def resume_dir(out_dir: Path) -> Path:
    """Where a job building ``out_dir`` keeps its resumable checkpoints."""
    return out_dir.parent / f".resume-{out_dir.name}"


def uses_gpu(settings: LaunchSettings) -> bool:
    """Whether the job's workers take GPUs (``auto``: when the Ray cluster has any)."""
    import ray

    if settings.use_gpu == "auto":
        return int(ray.cluster_resources().get("GPU", 0)) > 0
    return settings.use_gpu == "true"


def launch(loop: Callable[[dict[str, Any]], None], config: Any, zoo: Any, name: str, out_dir: Path,
           log: Callable[[str], None] = print, **extra: Any) -> dict[str, Any]:
    """Run ``loop`` with DeepSpeed on Ray Train workers; copy rank 0's files to ``out_dir``.

    ``config`` is the job's training-config dataclass: its ``launch`` settings
    place the workers, its ``batch_size`` and ``grad_clip`` fill
    the DeepSpeed config. The loop receives ``{"config", "zoo", **extra}``
    plus ``deepspeed`` (the resolved DeepSpeed config), ``home``
    (``$SPECSWEEP_HOME``), ``gpu`` and ``cpus_per_worker``. Returns the
    metrics the loop reported last.
    """
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if not ray.is_initialized():
        start_local_ray(os.cpu_count() or 1)
    settings: LaunchSettings = config.launch
    gpu = uses_gpu(settings)
    resume = resume_dir(out_dir)
    loop_config = {"config": config, "zoo": zoo, **extra, "home": str(specsweep_home()), "gpu": gpu,
                   "cpus_per_worker": settings.cpus_per_worker, "checkpoint_every": settings.checkpoint_every,
                   "resume_dir": str(resume),
                   "deepspeed": deepspeed_settings(settings, config.batch_size, config.grad_clip, gpu)}
    resources = {"CPU": settings.cpus_per_worker, **({"GPU": 1} if gpu else {})}
    storage = specsweep_home() / "ray_train"
    storage.mkdir(parents=True, exist_ok=True)
    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=settings.num_workers, use_gpu=gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        run_config=RunConfig(name=f"{name}-{int(time.time())}", storage_path=str(storage)),
    )
    started = time.perf_counter()
    log(f"training {name} on {settings.num_workers} {'GPU' if gpu else 'CPU'} worker(s) with DeepSpeed "
        f"ZeRO-{loop_config['deepspeed']['zero_optimization']['stage']}")
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"training {name} finished without reporting its files")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out_dir.parent))
    result.checkpoint.to_directory(str(staging))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.replace(out_dir)
    shutil.rmtree(resume, ignore_errors=True)
    metrics = dict(result.metrics or {})
    metrics["train_seconds"] = time.perf_counter() - started
    return metrics


# ---------------------------------------------------------------------------- inside the workers


def worker_device(loop_config: dict[str, Any]):
    """This worker's torch device (its GPU, or the CPU with one thread per reserved core); sets ``$SPECSWEEP_HOME``."""
    import ray.train.torch
    import torch

    os.environ["SPECSWEEP_HOME"] = loop_config["home"]
    if loop_config["gpu"]:
        return ray.train.torch.get_device()
    torch.set_num_threads(loop_config["cpus_per_worker"])
    return torch.device("cpu")


def deepspeed_engine(model, optimizer, config: dict[str, Any]):
    """Wrap ``model`` and a ``torch.optim`` optimizer in a DeepSpeed engine (process group already set up)."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, dist_init_required=False)
    return engine


def report_files(metrics: dict[str, Any], write: Callable[[Path], None]) -> None:
    """Report final ``metrics``; rank 0 also hands over the files ``write(directory)`` creates."""
    import ray.train

    if ray.train.get_context().get_world_rank() != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as directory:
        write(Path(directory))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
