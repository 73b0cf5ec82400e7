"""On the driver, before Ray starts: every Hugging Face hub model and ``hf:`` dataset a sweep names is either in
the local Hugging Face cache or reachable on the hub. Otherwise each is one line (offline, no route, no such
repository, gated), reported together, and nothing has started."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from harness.core.errors import ConfigError, ErrorCollector
from harness.core.models import ARTIFACT_PREFIX, ModelSpec
from harness.core.prompts import HF_PREFIX
from harness.core.sources import is_converted_source

PROBE_TIMEOUT_S = 10.0
OFFLINE_VALUES = ("1", "true", "yes", "on")

# (repo type, repo id, revision) -> None when reachable, else why not (a short phrase)
Probe = Callable[[str, str, str | None], str | None]


def hub_references(sweep: Any) -> Iterator[tuple[str, str, str, str | None]]:
    """(field, repo type, repo id, revision) of each hub model and dataset the sweep names: targets, drafts,
    ``hf:`` prompt sets, and the targets and ``hf:`` text sources of its training configs."""
    for role, specs in (("targets", sweep.targets), ("drafts", sweep.drafts)):
        for name, spec in specs.items():
            if is_hub_model(spec):
                yield f"models.{role}.{name}.id", "model", spec.id, spec.revision
    for index, prompt_set in enumerate(sweep.prompt_sets):
        if prompt_set.source.startswith(HF_PREFIX):
            yield f"prompts[{index}].source", "dataset", prompt_set.source[len(HF_PREFIX):], None
    for name, request in sweep.train.items():
        target = getattr(request.config, "target", None)
        if isinstance(target, ModelSpec) and is_hub_model(target):
            yield f"train.{name}.target", "model", target.id, target.revision
        data = getattr(request.config, "data", None)
        for source in getattr(data, "sources", ()) or ():
            dataset = source.removeprefix("answers:")
            if dataset.startswith(HF_PREFIX):
                yield f"train.{name}.data.sources", "dataset", dataset[len(HF_PREFIX):].partition(":")[0], None


def is_hub_model(spec: ModelSpec) -> bool:
    """Whether ``spec`` names a hub repository (not the zoo, a trained artefact, a converted file or a local path)."""
    return not (spec.zoo_name is not None or spec.id.startswith(ARTIFACT_PREFIX) or is_converted_source(spec.id)
                or Path(spec.id).expanduser().exists())


def check_hub(sweep: Any, probe: Probe | None = None) -> None:
    """``ConfigError``s, all at once, for each hub model or dataset the sweep names that is neither cached here nor
    reachable."""
    problems = ErrorCollector()
    probe = probe or probe_hub
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in OFFLINE_VALUES
    seen: dict[tuple[str, str, str | None], str | None] = {}
    for where, repo_type, repo_id, revision in hub_references(sweep):
        if is_cached(repo_type, repo_id):
            continue
        what = f"hub {repo_type} {repo_id!r}"
        fetch = f"download it where the hub is reachable (hf download {repo_id}" \
                f"{' --repo-type dataset' if repo_type == 'dataset' else ''}) into this machine's Hugging Face cache"
        if offline:
            problems.add(ConfigError(where, f"{what} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set",
                                     f"{fetch}, or unset HF_HUB_OFFLINE"))
            continue
        key = (repo_type, repo_id, revision)
        if key not in seen:
            seen[key] = probe(repo_type, repo_id, revision)
        if seen[key] is not None:
            problems.add(ConfigError(where, f"{what} is not in the local Hugging Face cache and {seen[key]}", fetch))
    problems.raise_if_any()


def is_cached(repo_type: str, repo_id: str) -> bool:
    """Whether the Hugging Face cache holds a snapshot of the repository."""
    from huggingface_hub import constants  # lazy: only sweeps that name the hub pay for it

    folder = Path(constants.HF_HUB_CACHE) / f"{repo_type}s--{repo_id.replace('/', '--')}" / "snapshots"
    return folder.is_dir() and any(folder.iterdir())


def probe_hub(repo_type: str, repo_id: str, revision: str | None) -> str | None:
    """None when the hub answers for the repository, else why not."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    api = HfApi()
    info = api.dataset_info if repo_type == "dataset" else api.model_info
    try:
        info(repo_id, revision=revision, timeout=PROBE_TIMEOUT_S)
    except GatedRepoError:
        return "the hub says it is gated: accept its terms and log in (hf auth login)"
    except RevisionNotFoundError:
        return f"the hub has no revision {revision!r} of it"
    except RepositoryNotFoundError:
        return "the hub has no such repository (or it is private)"
    except Exception as error:  # no route, DNS, TLS, proxy, timeout: all mean the hub cannot be reached
        return f"the hub is not reachable ({type(error).__name__})"
    return None
