"""The driver: start Ray and the workers, hand cells to idle workers, store each result as it arrives.

Dispatch is pull-based over ``ray.wait`` (pending reference -> event): a
worker that is idle gets the next ready cell, preferring one whose target it
already holds. Baseline cells run first; a strategy cell becomes ready when
its baseline has a result, which is handed to it (put once in the object
store) so that every strategy on a shard is paired with the same baseline.
A cell that needs a trained artefact (an EAGLE head) that is not yet in the
artefact cache waits for it: each missing artefact is trained once, by a
Ray task that runs the Ray Train + DeepSpeed job, while the other cells run
on the workers that the job's resources leave free.
A worker that dies is replaced, and its cell re-queued up to
``run.max_retries`` times before it is recorded as failed; a replacement
takes cells only once it has started. Cells already recorded in the run
directory are skipped (resume).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from harness.core.errors import ConfigError, InfraError
from harness.core.local_ray import start_local_ray
from harness.core.paths import specsweep_home
from harness.core.records import CellRecord
from harness.core.results import ResultStore
from harness.driver.config import Cell, Sweep
from harness.driver.preflight import prepare_models
from harness.driver.progress import Progress
from harness.driver.provenance import build_label
from harness.driver.worker import Worker
from training.artifacts import build_artifact
from training.launch import uses_gpu
from training.zoo import build_zoo, format_manifest, is_built

WORKER_START_TIMEOUT_S = 900.0


@dataclass
class SweepOutcome:
    """What a sweep run did: counts and where its results are."""

    run_dir: Path
    total: int
    skipped: int
    ok: int = 0
    failed: int = 0
    failed_ids: list[str] = field(default_factory=list)
    timings: list[dict[str, float]] = field(default_factory=list)
    trained: list[dict[str, Any]] = field(default_factory=list)  # manifests of artefacts this run trained


@dataclass
class WorkerSlot:
    """Driver-side state of one worker actor."""

    name: str
    handle: Any
    env_key: str
    state: str = "starting"  # starting | idle | busy
    targets: set[str] = field(default_factory=set)
    cell: Cell | None = None
    node: str = ""
    started: float = 0.0  # when it was asked to start, on the dispatcher's clock


def init_ray(sweep: Sweep, address: str | None, connect_timeout_s: float = 60.0) -> bool:
    """Join the Ray cluster at ``address`` (or ``$RAY_ADDRESS``, as under ``ray job submit``; ``auto`` for the one
    ``ray start`` runs on this host) or start a separate local one even when such a cluster runs. Returns whether
    this call started Ray (then the caller shuts it down). ``InfraError`` when the cluster cannot be reached
    within ``connect_timeout_s``."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    with caller_sigterm_kept():
        _start_or_join(sweep, address, connect_timeout_s)
    return True


@contextlib.contextmanager
def caller_sigterm_kept() -> Iterator[None]:
    """Keep the caller's SIGTERM handler across ``ray.init``, which installs its own (one that exits at once)."""
    main = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if main and handler is not None:
            signal.signal(signal.SIGTERM, handler)


def _start_or_join(sweep: Sweep, address: str | None, connect_timeout_s: float) -> None:
    import ray

    if address:
        check_reachable(address, connect_timeout_s)
        try:
            ray.init(address=address, log_to_driver=True)
        except (ConnectionError, RuntimeError, ValueError) as error:
            raise InfraError(f"cannot join the Ray cluster at {address} ({type(error).__name__}: "
                             f"{str(error).splitlines()[0] if str(error) else ''})",
                             "start it (ray start --head), fix --address, or leave --address out for a local "
                             "cluster") from None
    else:
        start_local_ray(sweep.run.num_cpus or os.cpu_count() or 1)  # workers at niceness 0 (harness.core.local_ray)


def check_reachable(address: str, timeout_s: float) -> None:
    """``InfraError`` unless a Ray cluster answers at ``address`` within ``timeout_s`` (``auto``: one runs on this
    host; ``host:port``: its GCS port accepts a connection; ``ray://`` client addresses are left to Ray)."""
    if address == "auto":
        from ray._private.services import find_gcs_addresses  # lazy: Ray

        if not find_gcs_addresses():
            raise InfraError("--address auto: no Ray cluster is running on this host",
                             "start one with `ray start --head`, or leave --address out for a local cluster")
        return
    if "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise InfraError(f"--address {address!r} is not host:port", "e.g. --address 10.0.0.5:6379, or auto")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as error:
        raise InfraError(f"no Ray cluster answers at {address} within {timeout_s:.0f} s "
                         f"({error.strerror or type(error).__name__})",
                         "check the address and that `ray start --head` runs there") from None


def worker_plan(sweep: Sweep) -> tuple[int, dict[str, Any], str]:
    """How many workers to start, their Ray resource options, and the device type they use."""
    import ray

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    per_worker = max(spec.num_gpus for spec in sweep.targets.values())  # a device_map target spans several GPUs
    if gpus and sweep.device in ("auto", "cuda"):
        if gpus < per_worker:
            raise ConfigError("models.targets.num_gpus", f"a worker needs {per_worker} GPUs, the cluster has {gpus}",
                              "lower num_gpus or join a larger cluster")
        return gpus // per_worker, {"num_gpus": per_worker, "num_cpus": 1}, "cuda"
    if sweep.device == "cuda":
        raise ConfigError("models.device", "cuda requested but the Ray cluster has no GPUs", "use device: auto or cpu")
    cpus = int(resources.get("CPU", 1))
    count = min(sweep.run.workers, max(1, cpus))
    return count, {"num_cpus": max(1, cpus // count), "num_gpus": 0}, "cpu"


def train_artifact(request: Any, home: str) -> dict[str, Any]:
    """Ray task body: build one artefact (it launches its own Ray Train job) and return its manifest."""
    os.environ["SPECSWEEP_HOME"] = home

    return build_artifact(request, log=lambda message: print(message, flush=True))


def job_demand(request: Any, device: str) -> tuple[int, int]:
    """(GPUs, CPUs) that the training job of ``request`` reserves on the cluster."""

    launch = request.config.launch
    gpus = launch.num_workers if device == "cuda" and uses_gpu(launch) else 0
    return gpus, launch.cpu_demand()


def reserved_workers(requests: list[Any], count: int, options: dict[str, Any], device: str) -> int:
    """How many of ``count`` workers to hold back so that the training jobs of ``requests`` can be placed."""
    import ray

    if not requests:
        return 0
    if device == "cuda":
        demand = sum(job_demand(r, device)[0] for r in requests)
        free = int(ray.cluster_resources().get("GPU", 0)) - count * options.get("num_gpus", 1)
        per = options.get("num_gpus", 1)
    else:
        demand = sum(job_demand(r, device)[1] for r in requests)
        free = int(ray.cluster_resources().get("CPU", 1)) - count * options["num_cpus"]
        per = options["num_cpus"]
    return min(count, math.ceil(max(0, demand - free) / per))


def jobs_that_fit(queued: list[Any], running: list[Any], workers: int, options: dict[str, Any], device: str,
                  resources: dict[str, float]) -> list[Any]:
    """The queued training jobs to start now: those whose GPUs and CPUs fit beside the running jobs and the
    ``workers`` started workers (at least one when none runs, so that a job larger than the cluster still fails
    loudly in Ray Train instead of waiting forever). Ray Train gives up on a worker group it cannot place within
    a minute, so jobs that would queue for the same GPU are started one after another instead."""
    free_gpus = resources.get("GPU", 0) - workers * options.get("num_gpus", 0)
    free_cpus = resources.get("CPU", 1) - workers * options.get("num_cpus", 1)
    for job in running:
        gpus, cpus = job_demand(job, device)
        free_gpus, free_cpus = free_gpus - gpus, free_cpus - cpus
    admitted = []
    for job in queued:
        gpus, cpus = job_demand(job, device)
        if (running or admitted) and (gpus > free_gpus or cpus > free_cpus):
            break
        admitted.append(job)
        free_gpus, free_cpus = free_gpus - gpus, free_cpus - cpus
    return admitted


def env_key(runtime_env: dict[str, Any]) -> str:
    return json.dumps(runtime_env, sort_keys=True)


class Dispatcher:
    """Keeps every worker busy with one cell at a time and writes results as they come back."""

    def __init__(self, sweep: Sweep, store: ResultStore, log: Callable[[str], None],
                 plan: tuple[int, dict[str, Any], str],
                 on_record: Callable[["Dispatcher", CellRecord], None] | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        import ray

        self.ray = ray
        self.sweep = sweep
        self.store = store
        self.log = log
        self.on_record = on_record
        self.clock = clock  # seconds; time limits and driver timings read it (tests inject one)
        self.count, self.options, self.device = plan
        self.remote_cls = ray.remote(Worker)
        self.slots: dict[str, WorkerSlot] = {}
        self.commit = build_label()
        self._serial = 0
        self.pending: dict[Any, tuple[str, str, Cell | None, float]] = {}  # ref -> (event, worker, cell, submitted)
        self.baselines: dict[str, Any] = {}  # baseline cell id -> object ref of its ok record
        self.baseline_errors: dict[str, str] = {}
        self.blocked: dict[str, set[str]] = {}  # cell id -> keys of artefacts it still waits for
        self.reserved = 0  # workers held back while training jobs run
        self.start_failures = 0  # workers that died while starting (replaced up to run.max_retries times)
        self.training_queue: list[Any] = []  # artefact requests waiting for resources
        self.training: dict[str, Any] = {}  # artefact key -> request of the jobs running

    # ------------------------------------------------------------------ workers

    def start_worker(self, runtime_env: dict[str, Any]) -> WorkerSlot:
        """Start a worker actor; it takes cells once its ``describe`` call returns."""

        self._serial += 1
        name = f"worker-{self._serial}"
        env_vars = {"SPECSWEEP_HOME": str(specsweep_home()), "TOKENIZERS_PARALLELISM": "false"}
        if self.device == "cpu":
            env_vars["RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"] = "1"
        merged = {**runtime_env, "env_vars": {**env_vars, **runtime_env.get("env_vars", {})}}
        threads = self.options["num_cpus"] if self.device == "cpu" else None
        cache_bytes = int(self.sweep.run.cache_memory_gb * 2**30) if self.sweep.run.cache_memory_gb else None
        handle = self.remote_cls.options(**self.options, runtime_env=merged, scheduling_strategy="SPREAD").remote(
            self.sweep.zoo, self.device, name, threads, self.sweep.plugins, cache_bytes,
            self.sweep.run.compile and self.device == "cuda")
        slot = WorkerSlot(name=name, handle=handle, env_key=env_key(runtime_env), started=self.clock())
        self.slots[name] = slot
        self.pending[handle.describe.remote()] = ("start", name, None, self.clock())
        return slot

    def retire(self, name: str) -> None:
        slot = self.slots.pop(name, None)
        if slot is None:
            return
        try:
            self.ray.kill(slot.handle)
        except Exception:  # already dead
            pass

    def busy_workers(self) -> dict[str, Cell]:
        """Cells in flight by worker name."""
        return {name: slot.cell for name, slot in self.slots.items() if slot.state == "busy" and slot.cell}

    # ------------------------------------------------------------------ main loop

    def run(self, cells: list[Cell], outcome: SweepOutcome, recorded: dict[str, CellRecord],
            progress: Progress) -> None:
        """Run ``cells`` to completion (or recorded failure); ``recorded`` holds results from earlier runs."""
        for cell_id, record in recorded.items():
            if record.kind == "baseline" and record.ok:
                self.baselines[cell_id] = self.ray.put(record)
            elif record.kind == "baseline":
                self.baseline_errors[cell_id] = record.error or "failed"
        queue: deque[Cell] = deque()
        waiting: dict[str, list[Cell]] = {}
        jobs: dict[str, Any] = {}
        held: dict[str, Cell] = {}
        for cell in cells:
            missing = {request.key(): request for request in cell.artifacts.values() if not request.built()}
            if missing:
                jobs.update(missing)
                self.blocked[cell.cell_id] = set(missing)
                held[cell.cell_id] = cell
            else:
                self._route(cell, queue, waiting, outcome, progress)
        attempts: dict[str, int] = {}
        envs = {env_key(cell.runtime_env): cell.runtime_env for cell in cells}
        first_env = cells[0].runtime_env if cells else {}
        self.reserved = reserved_workers(list(jobs.values()), self.count, self.options, self.device)
        for _ in range(self.count - self.reserved):
            self.start_worker(first_env)
        self.training_queue = list(jobs.values())
        self._admit_training()

        while queue or waiting or self.blocked or any(event in ("run", "train") for event, *_ in self.pending.values()):
            if not self.pending:
                raise InfraError("no worker is running or starting", "see sweep.log, then resume")
            ready, _ = self.ray.wait(list(self.pending), num_returns=1, timeout=1.0)
            progress.refresh(self.busy_workers())
            self._check_cell_timeouts(waiting, queue, outcome, progress)
            if not ready:
                self._check_start_timeouts(queue, waiting, outcome, progress)
                continue
            ref = ready[0]
            event, name, cell, submitted = self.pending.pop(ref)
            slot = self.slots.get(name)
            if event == "train":
                self.training.pop(name, None)
                self._trained(ref, name, held, queue, waiting, outcome, progress)
                self._admit_training()
                if self.reserved and not self.training:
                    for _ in range(self.reserved):
                        self.start_worker(first_env)
                    self.reserved = 0
            elif event == "start":
                try:
                    info = self.ray.get(ref)
                except self.ray.exceptions.RayError as error:
                    self._start_failed(name, error)
                    continue
                if slot is not None:
                    slot.state, slot.node = "idle", info.get("node", "")
            else:
                received = self.clock()
                try:
                    record = self.ray.get(ref)
                except self.ray.exceptions.RayError as error:
                    self._worker_lost(name, cell, error, attempts, queue, outcome, progress)
                    continue
                self._released(record, cell, waiting, queue, outcome, progress)
                stored = self.clock()
                self._store(record, outcome, progress)
                now = self.clock()
                outcome.timings.append({"driver_s": received - submitted, "worker_s": float(record.seconds or 0.0),
                                        "store_s": now - stored, "submitted": submitted, "stored": now})
                if slot is not None:
                    slot.state, slot.cell = "idle", None
                    slot.targets.add(cell.target_spec.id)
            self._assign_idle(queue, attempts, envs)
        for name in list(self.slots):
            self.retire(name)

    def _route(self, cell: Cell, queue: deque[Cell], waiting: dict[str, list[Cell]], outcome: SweepOutcome,
               progress: Progress) -> None:
        """Queue a cell whose artefacts exist: now, once its baseline is done, or as failed if that failed."""
        if cell.kind == "baseline" or not cell.baseline_id or cell.baseline_id in self.baselines:
            queue.append(cell)
        elif cell.baseline_id in self.baseline_errors:
            self._store(self._failed_record(cell, f"baseline cell {cell.baseline_id} failed: "
                                                  f"{self.baseline_errors[cell.baseline_id]}"), outcome, progress)
        else:
            waiting.setdefault(cell.baseline_id, []).append(cell)

    def _admit_training(self) -> None:
        """Start the queued training jobs that the cluster can place now."""
        resources = self.ray.cluster_resources()
        for request in jobs_that_fit(self.training_queue, list(self.training.values()), self.count - self.reserved,
                                     self.options, self.device, resources):
            self.training_queue.remove(request)
            self.training[request.key()] = request
            self._start_training(request)

    def _start_training(self, request: Any) -> None:
        """Launch the one training job that builds ``request`` (a Ray task running a Ray Train job)."""

        self.log(f"training {request.label()} (needed by this sweep; cached for later runs)")
        task = self.ray.remote(train_artifact).options(num_cpus=0, max_retries=0)
        ref = task.remote(request, str(specsweep_home()))
        self.pending[ref] = ("train", request.key(), None, self.clock())

    def _trained(self, ref: Any, key: str, held: dict[str, Cell], queue: deque[Cell],
                 waiting: dict[str, list[Cell]], outcome: SweepOutcome, progress: Progress) -> None:
        """A training job ended: release the cells that waited only for it, or fail them if it failed."""
        try:
            manifest = self.ray.get(ref)
            error = None
            outcome.trained.append(manifest)
            self.log(f"trained artefact {key} in {manifest.get('seconds', 0):.0f} s")
        except self.ray.exceptions.RayError as failure:
            error = f"training artefact {key} failed: {type(failure).__name__}: {str(failure)[:500]}"
            self.log(error)
        for cell_id in [cid for cid, keys in self.blocked.items() if key in keys]:
            keys = self.blocked[cell_id]
            keys.discard(key)
            if error is not None:
                del self.blocked[cell_id]
                self._store(self._failed_record(held.pop(cell_id), error), outcome, progress)
            elif not keys:
                del self.blocked[cell_id]
                self._route(held.pop(cell_id), queue, waiting, outcome, progress)

    def _assign_idle(self, queue: deque[Cell], attempts: dict[str, int], envs: dict[str, dict]) -> None:
        for name, slot in list(self.slots.items()):
            if slot.state != "idle" or not queue:
                continue
            cell = self._pick(queue, slot)
            if cell is None:
                # Nothing for this worker's runtime environment: restart it in the one the queue needs next.
                self.retire(name)
                self.start_worker(envs[env_key(queue[0].runtime_env)])
                continue
            attempts[cell.cell_id] = attempts.get(cell.cell_id, 0) + 1
            baseline = self.baselines.get(cell.baseline_id) if cell.kind == "strategy" else None
            self.pending[slot.handle.run.remote(cell, baseline)] = ("run", name, cell, self.clock())
            slot.state, slot.cell = "busy", cell

    @staticmethod
    def _pick(queue: deque[Cell], slot: WorkerSlot) -> Cell | None:
        """Next cell for ``slot``: its runtime environment, preferring a target it holds, baselines first."""
        best_index, best_score = None, None
        for index, cell in enumerate(queue):
            if env_key(cell.runtime_env) != slot.env_key:
                continue
            score = (cell.target_spec.id in slot.targets, cell.kind == "baseline")
            if best_score is None or score > best_score:
                best_index, best_score = index, score
                if score == (True, True):
                    break
        if best_index is None:
            return None
        cell = queue[best_index]
        del queue[best_index]
        return cell

    def _released(self, record: CellRecord, cell: Cell, waiting: dict[str, list[Cell]], queue: deque[Cell],
                  outcome: SweepOutcome, progress: Progress) -> None:
        """After a baseline finishes: queue its strategy cells, or fail them if it failed."""
        if cell.kind != "baseline":
            return
        dependents = waiting.pop(cell.cell_id, [])
        if record.ok:
            self.baselines[cell.cell_id] = self.ray.put(record)
            queue.extend(dependents)
        else:
            self.baseline_errors[cell.cell_id] = record.error or "failed"
            for dependent in dependents:
                self._store(self._failed_record(dependent, f"baseline cell {cell.cell_id} failed: {record.error}"),
                            outcome, progress)

    def _start_failed(self, name: str, error: Exception) -> None:
        """A worker died while starting: replace it, up to ``run.max_retries`` times in all; then stop the sweep
        (``InfraError``) without recording any cell as failed for it."""
        slot = self.slots.get(name)
        env = json.loads(slot.env_key) if slot is not None else {}
        self.retire(name)
        self.start_failures += 1
        reason = f"{type(error).__name__}: {str(error).strip().splitlines()[-1][:300] if str(error).strip() else ''}"
        if self.start_failures > self.sweep.run.max_retries:
            raise InfraError(f"workers failed to start {self.start_failures} times (last: {reason})",
                             "see sweep.log; fix the cause and resume; run.max_retries sets how many starts to try")
        self.log(f"{name} failed to start ({reason}); starting a replacement "
                 f"({self.start_failures} of {self.sweep.run.max_retries} retries)")
        self.start_worker(env)

    def _worker_lost(self, name: str, cell: Cell, error: Exception, attempts: dict[str, int], queue: deque[Cell],
                     outcome: SweepOutcome, progress: Progress) -> None:
        self.log(f"{name} was lost while running {cell.cell_id} ({type(error).__name__}); starting a replacement")
        env = cell.runtime_env
        self.retire(name)
        self.start_worker(env)
        if attempts[cell.cell_id] <= self.sweep.run.max_retries:
            queue.appendleft(cell)
        else:
            self._store(self._failed_record(cell, f"worker lost {attempts[cell.cell_id]} times: "
                                                  f"{type(error).__name__}: {str(error)[:500]}"), outcome, progress)

    def _check_cell_timeouts(self, waiting: dict[str, list[Cell]], queue: deque[Cell], outcome: SweepOutcome,
                             progress: Progress) -> None:
        """Record each cell running past its time limit (``Cell.timeout_s``) as failed, "timed out", and replace
        its worker (a hung call cannot be interrupted inside the actor)."""
        now = self.clock()
        for ref, (event, name, cell, submitted) in list(self.pending.items()):
            if event != "run":
                continue
            limit = cell.timeout_s()
            if now - submitted <= limit:
                continue
            del self.pending[ref]
            source = "run.cell_timeout_s" if cell.run.cell_timeout_s is not None else \
                "the default scaled to its token budget; set run.cell_timeout_s to change it"
            self.log(f"{name}: {cell.label} timed out after {limit:.0f} s; starting a replacement worker")
            self.retire(name)
            self.start_worker(cell.runtime_env)
            record = self._failed_record(cell, f"timed out after {limit:.0f} s ({source})")
            self._released(record, cell, waiting, queue, outcome, progress)
            self._store(record, outcome, progress)

    def _check_start_timeouts(self, queue: deque[Cell], waiting: dict[str, list[Cell]], outcome: SweepOutcome,
                              progress: Progress) -> None:
        now = self.clock()
        running = any(event in ("run", "train") for event, *_ in self.pending.values())
        starting = [s for s in self.slots.values() if s.state == "starting"]
        if running or not starting or any(s.state == "idle" for s in self.slots.values()):
            return
        if all(now - s.started > WORKER_START_TIMEOUT_S for s in starting):
            raise InfraError(f"no worker could be placed within {WORKER_START_TIMEOUT_S:.0f} s (the cluster lacks "
                             f"{self.options} per worker?)", "free or add resources, then resume")

    @staticmethod
    def _failed_record(cell: Cell, error: str) -> CellRecord:
        return CellRecord(cell_id=cell.cell_id, kind=cell.kind, label=cell.label, cell=cell.identity(),
                          status="failed", error=error)

    def _store(self, record: CellRecord, outcome: SweepOutcome, progress: Progress) -> None:
        record.commit = self.commit
        self.store.append(record)
        if record.ok:
            outcome.ok += 1
        else:
            outcome.failed += 1
            outcome.failed_ids.append(record.cell_id)
        progress.cell_done(record)
        if self.on_record is not None:
            self.on_record(self, record)


def run_sweep(sweep: Sweep, run_dir: Path, address: str | None = None, log: Callable[[str], None] | None = None,
              retry_failed: bool = False, retry_suspect: bool = False,
              on_record: Callable[[Dispatcher, CellRecord], None] | None = None,
              stream: Any = None, connect_timeout_s: float = 60.0,
              clock: Callable[[], float] = time.perf_counter) -> SweepOutcome:
    """Run every cell of ``sweep`` not yet recorded in ``run_dir`` (and, when asked, those recorded as failed or
    as ``timing_suspect``); return the outcome. An interrupt (``KeyboardInterrupt``) or an ``InfraError``
    abandons the cells in flight (unrecorded, so a resume runs them) and shuts down the Ray this call started.
    ``clock`` is what the cell and worker-start time limits are measured on."""
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    if sweep.uses_zoo_models():  # a built zoo is checked against its checksums (and rebuilt if corrupt)
        built = is_built(sweep.zoo, sweep.zoo_models())
        if not built:
            log("building the embedded zoo's models this sweep names (once; cached under $SPECSWEEP_HOME)")
        manifest = build_zoo(sweep.zoo, log=log, only=sweep.zoo_models())
        if not built:
            log(format_manifest(manifest))
    prepare_models(sweep, log)
    started_ray = init_ray(sweep, address, connect_timeout_s)
    try:
        return _run_cells(sweep, run_dir, log, retry_failed, retry_suspect, on_record, stream, clock)
    finally:
        if started_ray:
            import ray

            ray.shutdown()


def _run_cells(sweep: Sweep, run_dir: Path, log: Callable[[str], None], retry_failed: bool, retry_suspect: bool,
               on_record: Callable[[Dispatcher, CellRecord], None] | None, stream: Any,
               clock: Callable[[], float]) -> SweepOutcome:
    """``run_sweep`` once Ray runs: plan the workers, skip recorded cells, dispatch the rest."""
    store = ResultStore(run_dir)
    plan = worker_plan(sweep)
    cells = sweep.cells(device_type=plan[2])
    ids = {cell.cell_id for cell in cells}
    recorded = {cid: rec for cid, rec in store.latest().items() if cid in ids}
    def settled(record: CellRecord) -> bool:
        if not record.ok:
            return not retry_failed
        return not (retry_suspect and record.timing_suspect)
    done = {cid for cid, rec in recorded.items() if settled(rec)}
    todo = [cell for cell in cells if cell.cell_id not in done]
    outcome = SweepOutcome(run_dir=run_dir, total=len(cells), skipped=len(cells) - len(todo))
    outcome.failed_ids = [cid for cid in done if not recorded[cid].ok]
    outcome.failed = len(outcome.failed_ids)
    outcome.ok = outcome.skipped - outcome.failed
    if outcome.skipped:
        log(f"resuming {run_dir}: {outcome.skipped} of {len(cells)} cells already recorded")
    if not todo:
        return outcome
    if sweep.run.compile and plan[2] != "cuda":
        log("run.compile: the workers have no GPU, so cells decode eagerly on dynamic KV caches "
            "(CUDA graphs need CUDA)")
    dispatcher = Dispatcher(sweep, store, log, plan, on_record, clock)
    log(f"running {len(todo)} cells on {dispatcher.count} {dispatcher.device} worker(s); results -> {store.path}")
    progress = Progress(total=len(cells), done=outcome.ok, failed=outcome.failed, log=log, stream=stream)
    try:
        dispatcher.run(todo, outcome, recorded, progress)
    finally:
        progress.close()
        for name in list(dispatcher.slots):
            dispatcher.retire(name)
    return outcome
