"""An interrupted training run continues from its newest checkpoint to the very weights, losses and evaluations an
uninterrupted run reaches (the trainer skeleton's DeepSpeed engine, in this process over a one-rank gloo group)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
from torch import nn

from harness.core.errors import ConfigError
from training.launch import LaunchSettings, deepspeed_settings
from training.trainer import Checkpoints, OptimSettings, Worker

SETTINGS = OptimSettings(steps=7, batch_size=4, lr=0.05, warmup_steps=2)


class Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def process_group():
    """A one-rank gloo process group in this process, as a Ray Train worker has (DeepSpeed needs one)."""
    import torch.distributed as dist

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    saved = {name: os.environ.get(name) for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE",
                                                      "LOCAL_RANK")}
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def worker(resume_dir: Path | None, every: int) -> Worker:
    loop_config = {"config": SETTINGS, "checkpoint_every": every, "resume_dir": str(resume_dir or ""),
                   "deepspeed": deepspeed_settings(LaunchSettings(), SETTINGS.batch_size, SETTINGS.grad_clip,
                                                   gpu=False)}
    return Worker(loop_config, rank=0, world=1, device=torch.device("cpu"))


def model() -> nn.Module:
    torch.manual_seed(0)  # the same initial weights for every run; dropout then draws from torch's generator
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 4))


def draw(generator: torch.Generator) -> torch.Tensor:
    return torch.randn(SETTINGS.batch_size, 8, generator=generator)


def loss_failing_at(call: int | None):
    calls = []

    def loss(module: nn.Module, batch: torch.Tensor, generator: torch.Generator):
        calls.append(1)
        if call is not None and len(calls) == call + 1:
            raise Interrupted
        noisy = batch + 0.1 * torch.randn(batch.shape, generator=generator)
        return ((module(noisy) - batch[:, :4]) ** 2).mean(), {}
    return loss


def evaluation(counter: list[int]):
    def evaluate(module: nn.Module) -> dict[str, float]:
        counter.append(1)
        fixed = torch.linspace(-1, 1, 32).view(4, 8)
        return {"loss": ((module(fixed) - fixed[:, :4]) ** 2).mean().item()}
    return evaluate


def test_an_interrupted_run_resumes_to_what_an_uninterrupted_run_reaches(process_group, tmp_path):
    evaluations: list[int] = []
    whole = worker(None, 0).fit(model(), draw, loss_failing_at(None), torch.Generator().manual_seed(1),
                                evaluation(evaluations))
    assert len(evaluations) == 2 and len(whole.losses) == SETTINGS.steps

    with pytest.raises(Interrupted):  # dies during step 5, after the checkpoint of step 4
        worker(tmp_path, 2).fit(model(), draw, loss_failing_at(5), torch.Generator().manual_seed(1),
                                evaluation([]))
    assert (tmp_path / "fit1" / "latest").read_text().strip() == "step4"
    assert sorted(path.name for path in (tmp_path / "fit1").glob("step*")) == ["step4"]  # step 2's is dropped

    evaluations = []
    resumed = worker(tmp_path, 2).fit(model(), draw, loss_failing_at(None), torch.Generator().manual_seed(1),
                                      evaluation(evaluations))
    assert len(evaluations) == 1  # the evaluation before training comes from the checkpoint
    assert resumed.losses == whole.losses and resumed.before == whole.before and resumed.after == whole.after
    for (name, mine), theirs in zip(resumed.module.state_dict().items(), whole.module.state_dict().values()):
        assert torch.equal(mine, theirs), name


def test_a_resume_without_the_random_states_would_draw_other_batches(process_group, tmp_path, monkeypatch):
    """The check above can fail: restoring the weights and optimiser but not the batch generator diverges."""
    whole = worker(None, 0).fit(model(), draw, loss_failing_at(None), torch.Generator().manual_seed(1))
    with pytest.raises(Interrupted):
        worker(tmp_path, 3).fit(model(), draw, loss_failing_at(4), torch.Generator().manual_seed(1))
    restore = Checkpoints.load
    monkeypatch.setattr(Checkpoints, "load", lambda self, engine, generator: restore(self, engine, torch.Generator()))
    resumed = worker(tmp_path, 3).fit(model(), draw, loss_failing_at(None), torch.Generator().manual_seed(1))
    assert resumed.losses[:3] == whole.losses[:3] and resumed.losses[3:] != whole.losses[3:]


def test_cpu_autocast_runs_each_step_in_bfloat16_and_keeps_float32_weights(process_group):
    seen: list[torch.dtype] = []

    def loss(module: nn.Module, batch: torch.Tensor, generator: torch.Generator):
        out = module(batch)
        seen.append(out.dtype)
        return (out.float() ** 2).mean(), {}

    for autocast, wanted in ((True, torch.bfloat16), (False, torch.float32)):
        seen.clear()
        job = worker(None, 0)
        job.loop_config["config"] = OptimSettings(steps=2, batch_size=4, cpu_autocast=autocast)
        fitted = job.fit(model(), draw, loss, torch.Generator().manual_seed(1))
        assert seen == [wanted, wanted]
        assert {parameter.dtype for parameter in fitted.module.parameters()} == {torch.float32}


def test_checkpoints_fall_every_n_steps_but_never_after_the_last():
    checkpoints = Checkpoints(Path("unused"), every=3)
    assert [done for done in range(1, 10) if checkpoints.due(done, 9)] == [3, 6]


def test_each_fit_of_a_job_keeps_its_own_checkpoints(tmp_path):
    job = worker(tmp_path, 5)
    assert [job.next_checkpoints().directory.name for _ in range(2)] == ["fit1", "fit2"]
    assert worker(tmp_path, 0).next_checkpoints() is None


def test_a_negative_checkpoint_interval_is_refused_naming_the_field():
    with pytest.raises(ConfigError, match=r"launch\.checkpoint_every: expected an integer >= 0, got -1"):
        LaunchSettings.from_dict({"checkpoint_every": -1}, "launch", Path("."))
