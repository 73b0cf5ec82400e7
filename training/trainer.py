"""The trainer skeleton every Ray Train artefact kind trains through, and the optimisation settings they share.

A kind's ``train_loop`` starts a :class:`Worker` (rank, world size, device,
seed), builds its model and data, and hands :meth:`Worker.fit` what only it
knows: the trainable module, how to draw a batch, the loss, and how to
evaluate. The skeleton owns the rest, the same for every kind: AdamW over the
trainable parameters, the DeepSpeed engine, the learning-rate schedule,
evaluation before and after (in eval mode, training in train mode), the loss
history and progress lines; :meth:`Worker.finish` reports the metrics and
hands rank 0's files back to the launcher (``training.launch``).

:class:`OptimSettings` is the base of every such kind's config. A kind
re-declares a field to change its default; ``KEYED_ONLY_WHEN_SET`` names the
fields the kind had fixed in code before they were settings, which its
artefact key hashes only when set to something else, so that artefacts
trained before keep their keys.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch

from harness.core.errors import ConfigError, ErrorCollector
from training.launch import LaunchSettings, deepspeed_engine, report_files, worker_device
from training.settings import TrainSettings, field_path

SCHEDULES = ("warmup_cosine", "warmup_constant")
Batch = Any
LossFn = Callable[[torch.nn.Module, Batch, torch.Generator], tuple[torch.Tensor, dict[str, float]]]


@dataclass(frozen=True)
class OptimSettings(TrainSettings):
    """The optimisation fields every trained kind shares (AdamW, a warm-up then cosine or constant schedule)."""

    steps: int = 200
    batch_size: int = 8
    lr: float = 1e-3
    schedule: str = "warmup_cosine"  # warmup_cosine | warmup_constant
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    grad_clip: float = 1.0
    cpu_autocast: bool = False  # on a CPU worker, forward and loss under bfloat16 autocast (weights stay float32)
    seed: int = 0
    launch: LaunchSettings = field(default_factory=LaunchSettings)

    KEYED_ONLY_WHEN_SET: ClassVar[frozenset[str]] = frozenset({"schedule", "adam_beta1", "adam_beta2",
                                                               "cpu_autocast"})

    def check(self, where: str) -> None:
        """Refuse optimisation settings out of range, naming every field at fault."""
        problems = ErrorCollector()
        for name, low in (("steps", 1), ("batch_size", 1), ("warmup_steps", 0)):
            if getattr(self, name) < low:
                problems.add(ConfigError(field_path(where, name), f"must be >= {low}, got {getattr(self, name)}"))
        for name in ("lr", "grad_clip"):
            if getattr(self, name) <= 0:
                problems.add(ConfigError(field_path(where, name), f"must be > 0, got {getattr(self, name)}"))
        if self.weight_decay < 0:
            problems.add(ConfigError(field_path(where, "weight_decay"), f"must be >= 0, got {self.weight_decay}"))
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                problems.add(ConfigError(field_path(where, name), f"must be in [0, 1), got {getattr(self, name)}"))
        if self.schedule not in SCHEDULES:
            problems.add(ConfigError(field_path(where, "schedule"), f"unknown schedule {self.schedule!r}",
                                     f"choose {' or '.join(SCHEDULES)}"))
        problems.raise_if_any()

    def lr_at(self, step: int) -> float:
        """The learning rate at ``step``."""
        if self.schedule == "warmup_constant":
            return self.lr * min(1.0, (step + 1) / max(1, self.warmup_steps))
        return self.lr * warmup_cosine(step, self.steps, self.warmup_steps)


LEGACY_ADAMW = frozenset({"schedule", "warmup_steps", "weight_decay", "adam_beta1", "adam_beta2", "grad_clip",
                          "cpu_autocast"})
"""The fields a kind trained with torch's AdamW defaults, a constant rate and clipping at 1 fixed in code (and
float32), which its key hashes only when set away from those."""


def warmup_cosine(step: int, steps: int, warmup_steps: int) -> float:
    """The learning-rate factor at ``step``: linear warm-up over ``warmup_steps``, then cosine decay to 0 at ``steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class Fitted:
    """One optimisation run's result: the trained module, evaluations before and after, the loss per step."""

    module: torch.nn.Module
    before: dict[str, float]
    after: dict[str, float]
    losses: list[float]

    def loss_first(self, window: int = 10) -> float:
        """The mean training loss over the first ``window`` steps."""
        return sum(self.losses[:window]) / max(1, len(self.losses[:window]))

    def loss_last(self, window: int = 10) -> float:
        """The mean training loss over the last ``window`` steps."""
        return sum(self.losses[-window:]) / max(1, len(self.losses[-window:]))


@dataclass
class Worker:
    """One Ray Train worker's share of a job: the job's config and zoo, its rank, the world size, its device."""

    loop_config: dict[str, Any]
    rank: int
    world: int
    device: torch.device
    fits: int = 0

    @classmethod
    def start(cls, loop_config: dict[str, Any]) -> "Worker":
        """This worker (``$SPECSWEEP_HOME``, threads and device set), with torch seeded (``seed``)."""
        import ray.train

        context = ray.train.get_context()
        worker = cls(loop_config, context.get_world_rank(), context.get_world_size(), worker_device(loop_config))
        worker.seed()
        return worker

    @property
    def config(self) -> Any:
        return self.loop_config["config"]

    @property
    def zoo(self) -> Any:
        return self.loop_config["zoo"]

    def seed(self) -> None:
        """Seed torch's global generator for this rank (the config's seed plus the rank)."""
        torch.manual_seed(self.config.seed + self.rank)

    def generator(self, seed: int) -> torch.Generator:
        """A CPU generator for batch draws and noise, seeded with ``seed``."""
        return torch.Generator().manual_seed(seed)

    def fit(self, model: torch.nn.Module, batch: Callable[[torch.Generator], Batch], loss: LossFn,
            generator: torch.Generator, evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
            settings: OptimSettings | None = None, progress: str = "", shown: tuple[str, ...] = ()) -> Fitted:
        """Train ``model``'s trainable parameters for ``settings.steps`` steps (the job's config by default) and
        return it with its evaluations before and after; ``progress`` names the run in ten progress lines of
        rank 0, which show the stats named in ``shown``. With ``launch.checkpoint_every`` set, the run saves a
        checkpoint every that many steps and continues from the newest one it finds. ``cpu_autocast`` runs each
        step's forward and loss in bfloat16 on a CPU worker (evaluations stay float32); a GPU worker trains in
        DeepSpeed's bf16 either way."""
        settings = settings or self.config
        trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=settings.lr, betas=(settings.adam_beta1, settings.adam_beta2),
                                      weight_decay=settings.weight_decay)
        engine = deepspeed_engine(model, optimizer, self.loop_config["deepspeed"])
        module = engine.module
        checkpoints = self.next_checkpoints()
        resumed = checkpoints.load(engine, generator) if checkpoints else None
        if resumed is None:
            start, before, losses = 0, evaluated(module, evaluate), []
        else:
            start, before, losses = resumed.step, resumed.before, resumed.losses
            if progress and self.rank == 0:
                print(f"{progress}: resumed at step {start}/{settings.steps}", flush=True)
        module.train()
        autocast = settings.cpu_autocast and self.device.type == "cpu"
        for step in range(start, settings.steps):
            for group in optimizer.param_groups:
                group["lr"] = settings.lr_at(step)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                value, stats = loss(module, batch(generator), generator)
            engine.backward(value)
            engine.step()
            losses.append(value.item())
            if progress and self.rank == 0 and (step + 1) % max(1, settings.steps // 10) == 0:
                shown_stats = "".join(f" {name} {stats[name]:.4f}" for name in shown)
                print(f"{progress} step {step + 1}/{settings.steps}:{shown_stats}", flush=True)
            if checkpoints and checkpoints.due(step + 1, settings.steps):
                checkpoints.save(engine, generator, TrainingState(step + 1, before, losses))
        return Fitted(module, before, evaluated(module, evaluate), losses)

    def next_checkpoints(self) -> "Checkpoints | None":
        """The checkpoints of this worker's next ``fit`` (a job may fit more than once); ``None`` when the job
        saves none."""
        every = int(self.loop_config.get("checkpoint_every") or 0)
        self.fits += 1
        if not every or not self.loop_config.get("resume_dir"):
            return None
        return Checkpoints(Path(self.loop_config["resume_dir"]) / f"fit{self.fits}", every)

    def finish(self, metrics: dict[str, Any], write: Callable[[Any], None]) -> None:
        """Report ``metrics``; rank 0 also hands over the files ``write(directory)`` creates."""
        report_files(metrics, write)


@dataclass
class TrainingState:
    """What a run needs beside the DeepSpeed engine's state to continue: the steps done, the evaluation before
    training, and the loss history."""

    step: int
    before: dict[str, float]
    losses: list[float]


@dataclass
class Checkpoints:
    """One ``fit``'s resumable checkpoints in ``directory`` (DeepSpeed's layout, its ``latest`` tag), every
    ``every`` steps. Beside the engine's module and optimizer states they hold the training state and the random
    states (the batch generator's and torch's), so that a resumed run draws the batches and noise an
    uninterrupted one would."""

    directory: Path
    every: int

    def due(self, done: int, steps: int) -> bool:
        """Whether to save after ``done`` of ``steps`` steps (never after the last: the artefact follows)."""
        return done % self.every == 0 and done < steps

    def save(self, engine: Any, generator: torch.Generator, state: TrainingState) -> None:
        """Save the engine and ``state`` as the newest checkpoint (every rank saves its share), then drop the
        older ones."""
        client = {"training": asdict(state), "generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
                  "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
        tag = f"step{state.step}"
        engine.save_checkpoint(str(self.directory), tag=tag, client_state=client)  # ends at a barrier
        if engine.global_rank == 0:
            for older in self.directory.glob("step*"):
                if older.name != tag:
                    shutil.rmtree(older, ignore_errors=True)

    def load(self, engine: Any, generator: torch.Generator) -> TrainingState | None:
        """Restore the engine and the random states from the newest checkpoint and return its training state;
        ``None`` when there is none."""
        if not (self.directory / "latest").is_file():
            return None
        path, client = engine.load_checkpoint(str(self.directory))
        if path is None:
            return None
        generator.set_state(client["generator"])
        torch.set_rng_state(client["torch_rng"])
        if client["cuda_rng"]:
            torch.cuda.set_rng_state_all(client["cuda_rng"])
        return TrainingState(**client["training"])


def mean_stats(stats: list[dict[str, float]]) -> dict[str, float]:
    """Each statistic's mean over ``stats`` (one dict per evaluation batch, all with the same names)."""
    return {name: sum(batch[name] for batch in stats) / len(stats) for name in stats[0]}


def evaluated(module: torch.nn.Module, evaluate: Callable[[torch.nn.Module], dict[str, float]] | None
              ) -> dict[str, float]:
    """``evaluate(module)`` in eval mode without gradients, the module's mode restored; ``{}`` without one."""
    if evaluate is None:
        return {}
    training = module.training
    module.eval()
    try:
        with torch.no_grad():
            return evaluate(module)
    finally:
        module.train(training)
