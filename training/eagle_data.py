"""EAGLE training data: token windows with the target's last hidden states, as a sharded ``datasets`` artefact.

Text comes from the zoo's domains (``zoo:<domain>``, training split only), a
Hugging Face dataset (``hf:<name>[:<split>]``), a local ``.jsonl`` /
``.json`` / ``.txt`` / ``.parquet`` file (``field`` names the text column), or
the target's own chat answers to one of those (``answers:<source>``,
``answer_prompts`` prompts of at most ``answer_tokens`` tokens each).
The text of each source is tokenised into one stream (documents separated by
EOS) and cut into ``seq_len``-token windows, balanced across sources. Each
row holds ``input_ids``, ``hidden`` (the target's features after the final
norm, ``[seq_len, hidden]``), ``loss_mask`` (1 where a position is trained
on) and, for EAGLE-3, ``fused`` (named layers' hidden states, concatenated).
The dataset is saved with ``save_to_disk`` in ``shards`` files
under ``$SPECSWEEP_HOME/artifacts/eagle-data/<hash of target + data>``.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from harness.core.errors import ConfigError
from harness.core.models import ModelSpec
from harness.core.paths import content_hash, specsweep_home
from training.settings import parse_settings
from training.text import check_sources, token_windows

DONE_MARKER = "features.done"


@dataclass(frozen=True)
class FeatureDataConfig:
    """Which text, how much of it, and how it is windowed and stored."""

    sources: tuple[str, ...] = ("zoo:code", "zoo:prose", "zoo:legal", "zoo:math")
    samples: int = 2048
    seq_len: int = 128
    field: str = "text"
    shards: int = 4
    batch_size: int = 16
    seed: int = 0
    answer_prompts: int = 256  # prompts the target answers per answers:<source>
    answer_tokens: int = 128  # the longest answer, in tokens

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str) -> "FeatureDataConfig":
        """Validated data settings from the ``data`` mapping of a training config."""

        config = parse_settings(cls, raw, where, Path("."), ())
        check_sources(config.sources, f"{where}.sources", answers_allowed=True)
        for name in ("samples", "seq_len", "shards", "batch_size", "answer_prompts", "answer_tokens"):
            value = getattr(config, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{where}.{name}", f"expected a positive integer, got {value!r}")
        if config.seq_len < 2:
            raise ConfigError(f"{where}.seq_len", f"must be >= 2, got {config.seq_len}")
        return config


def features_dir(target: ModelSpec, target_key: str, data: FeatureDataConfig,
                 fused_layers: tuple[int, ...] = ()) -> Path:
    """Where the features of ``target`` (identified by ``target_key``) on ``data`` are cached (with the fused
    features of ``fused_layers`` too, when named)."""
    identity = ["eagle-data", target.as_dict(), target_key, asdict(data)]
    key = content_hash(identity + ([list(fused_layers)] if fused_layers else []))[:16]
    return specsweep_home() / "artifacts" / "eagle-data" / key


@torch.inference_mode()
def target_features(model, windows: torch.Tensor, batch_size: int, fused_layers: tuple[int, ...] = ()
                    ) -> Iterator[dict[str, Any]]:
    """Rows of (input_ids, hidden, loss_mask) from forward passes of ``model`` over ``windows``, plus ``fused``
    (the hidden states of ``fused_layers`` concatenated, EAGLE-3's input) when layers are named."""
    device = next(model.parameters()).device
    for start in range(0, len(windows), batch_size):
        batch = windows[start:start + batch_size].to(device)
        states = model(input_ids=batch, output_hidden_states=True).hidden_states
        hidden = states[-1].float().cpu()
        fused = torch.cat([states[index] for index in fused_layers], -1).float().cpu() if fused_layers else None
        for row, (ids, last) in enumerate(zip(batch.cpu(), hidden)):
            entry = {"input_ids": ids.tolist(), "hidden": last.numpy(), "loss_mask": [1] * len(ids)}
            if fused is not None:
                entry["fused"] = fused[row].numpy()
            yield entry


def build_features(model, tokenizer, data: FeatureDataConfig, zoo_corpus, out_dir: Path, target_identity: Any,
                   log: Callable[[str], None] = print, fused_layers: tuple[int, ...] = ()) -> Path:
    """Compute and save the feature dataset to ``out_dir`` (skipped if it is already there)."""
    from datasets import Array2D, Dataset, Features, Sequence, Value

    if (out_dir / DONE_MARKER).exists():
        return out_dir
    windows = token_windows(tokenizer, data, zoo_corpus, model, target_identity)
    hidden_size = int(model.config.hidden_size)
    features = Features({
        "input_ids": Sequence(Value("int32")),
        "hidden": Array2D(shape=(data.seq_len, hidden_size), dtype="float32"),
        "loss_mask": Sequence(Value("int8")),
        **({"fused": Array2D(shape=(data.seq_len, hidden_size * len(fused_layers)), dtype="float32")}
           if fused_layers else {}),
    })
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=".building-") as scratch:
        # Streamed to Arrow files as the forward passes yield rows: held as a list, 6,144 windows of 192 x 576
        # float32 features took 19 GB before conversion, and Ray's memory monitor killed the job.
        dataset = Dataset.from_generator(target_features, features=features, cache_dir=str(Path(scratch) / "arrow"),
                                         gen_kwargs={"model": model, "windows": windows,
                                                     "batch_size": data.batch_size, "fused_layers": fused_layers},
                                         fingerprint=out_dir.name)
        staging = Path(scratch) / "dataset"
        dataset.save_to_disk(str(staging), num_shards=min(data.shards, len(dataset)))
        (staging / DONE_MARKER).write_text("ok\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.replace(out_dir)
    log(f"EAGLE features: {len(windows)} windows x {data.seq_len} tokens from {', '.join(data.sources)} -> {out_dir}")
    return out_dir


@dataclass
class WorkerFeatures:
    """A training worker's view of a feature dataset: the whole training split (for vocabulary counts), this
    worker's shard of it, and the held-out rows, all on ``device``."""

    train: Any
    shard: Any
    eval_rows: dict[str, torch.Tensor]
    device: torch.device

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: value.to(self.device) for name, value in batch.items()}

    def draw(self, generator: torch.Generator, batch_size: int) -> dict[str, torch.Tensor]:
        """``batch_size`` rows of this worker's shard, drawn with replacement, on the device."""
        picks = torch.randint(0, len(self.shard), (batch_size,), generator=generator).tolist()
        return self.to_device(self.shard[picks])


def worker_features(worker: Any, model, tokenizer, data: FeatureDataConfig, data_dir: Path, target_identity: Any,
                    eval_fraction: float, fused_layers: tuple[int, ...] = ()) -> WorkerFeatures:
    """Rank 0 builds the features in ``data_dir`` (if missing), every rank waits for them, then reads its shard
    and the held-out split (``eval_fraction`` of the windows, split by ``data.seed``)."""
    import datasets
    import torch.distributed as dist

    if worker.rank == 0:
        build_features(model, tokenizer, data, worker.zoo.corpus, data_dir, target_identity,
                       fused_layers=fused_layers)
    if worker.world > 1:
        dist.barrier()
    rows = datasets.load_from_disk(str(data_dir)).with_format("torch")
    split = rows.train_test_split(test_size=eval_fraction, seed=data.seed)
    return WorkerFeatures(train=split["train"], shard=split["train"].shard(worker.world, worker.rank),
                          eval_rows=split["test"][:], device=worker.device)
