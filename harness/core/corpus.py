"""Offline text corpus for the embedded zoo: four domains found on every Python machine.

- ``code``:  the standard library's ``.py`` sources
- ``prose``: ``pydoc_data`` topics (English technical prose)
- ``legal``: licence texts shipped with installed distributions and CPython
- ``math``:  generated arithmetic word problems

Documents are split into train / held-out deterministically (by a hash of the
document id), so held-out prompts never appear in training.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import random
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

DOMAINS: tuple[str, ...] = ("code", "prose", "legal", "math")

_LICENCE_PREFIXES = ("LICENSE", "LICENCE", "COPYING", "NOTICE")
_SKIPPED_STDLIB_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "turtledemo", "ensurepip"}


@dataclass(frozen=True)
class Document:
    """One text document with its domain and a stable id."""

    domain: str
    doc_id: str
    text: str


def _stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def code_documents(max_chars: int) -> list[Document]:
    """Standard-library Python sources, in sorted path order, up to ``max_chars``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs: list[Document] = []
    total = 0
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if _SKIPPED_STDLIB_DIRS.intersection(relative.parts[:-1]):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not 500 <= len(text) <= 60_000:
            continue
        docs.append(Document("code", str(relative), text))
        total += len(text)
        if total >= max_chars:
            break
    return docs


def prose_documents(max_chars: int) -> list[Document]:
    """``pydoc_data`` help topics, in sorted topic order, up to ``max_chars``."""
    from pydoc_data.topics import topics

    docs: list[Document] = []
    total = 0
    for name in sorted(topics):
        text = topics[name].strip()
        if len(text) < 200:
            continue
        docs.append(Document("prose", name, text))
        total += len(text)
        if total >= max_chars:
            break
    return docs


def site_directories() -> list[str]:
    """The ``sys.path`` entries that hold installed distributions (``site-packages``, ``dist-packages``): not the
    working directory or a script's, whose in-tree metadata (an ``.egg-info``) would make the corpus depend on
    where a process started (a Ray worker in the repository read one licence more than the driver)."""
    return [entry for entry in sys.path if entry and Path(entry).name in ("site-packages", "dist-packages")]


def legal_documents(max_chars: int) -> list[Document]:
    """Distinct licence texts of installed distributions plus CPython's own licence."""
    candidates: list[tuple[str, Path]] = []
    cpython_licence = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    if cpython_licence.exists():
        candidates.append(("cpython/LICENSE.txt", cpython_licence))
    for dist in importlib.metadata.distributions(path=site_directories()):
        for file in dist.files or []:
            if file.name.upper().startswith(_LICENCE_PREFIXES):
                candidates.append((f"{dist.metadata['Name']}/{file}", Path(str(dist.locate_file(file)))))
    seen: set[int] = set()
    docs: list[Document] = []
    total = 0
    for doc_id, path in sorted(candidates):
        try:
            text = path.read_text(encoding="utf-8").strip()
        except (UnicodeDecodeError, OSError):
            continue
        key = _stable_hash(text)
        if len(text) < 300 or key in seen:
            continue
        seen.add(key)
        docs.append(Document("legal", doc_id, text))
        total += len(text)
        if total >= max_chars:
            break
    return docs


_NAMES = ("Ada", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goro", "Hana", "Ivan", "Jade", "Kofi", "Lena")
_ITEMS = ("apples", "books", "coins", "marbles", "pencils", "stamps", "cards", "shells", "tickets", "cookies")


def _word_problem(rng: random.Random) -> str:
    name, other = rng.sample(_NAMES, 2)
    item = rng.choice(_ITEMS)
    start = rng.randint(2, 60)
    kind = rng.randrange(4)
    if kind == 0:
        gained, lost = rng.randint(1, 40), rng.randint(1, start)
        middle = start + gained
        answer = middle - lost
        question = (f"{name} has {start} {item}. {name} gets {gained} more {item} and then gives "
                    f"{lost} {item} to {other}. How many {item} does {name} have now?")
        working = f"{start} + {gained} = {middle}. {middle} - {lost} = {answer}."
    elif kind == 1:
        groups, per = rng.randint(2, 12), rng.randint(2, 12)
        answer = groups * per
        question = f"{name} has {groups} boxes with {per} {item} in each box. How many {item} are there in total?"
        working = f"{groups} * {per} = {answer}."
    elif kind == 2:
        per = rng.randint(2, 9)
        groups = rng.randint(2, 12)
        total = per * groups
        answer = per
        question = f"{name} shares {total} {item} equally among {groups} friends. How many {item} does each friend get?"
        working = f"{total} / {groups} = {answer}."
    else:
        price, count, paid = rng.randint(1, 9), rng.randint(2, 9), 100
        cost = price * count
        answer = paid - cost
        question = (f"{name} buys {count} {item} at {price} dollars each and pays with {paid} dollars. "
                    f"How much change does {name} get?")
        working = f"{count} * {price} = {cost}. {paid} - {cost} = {answer}."
    return f"Question: {question}\nAnswer: {working} The answer is {answer}."


def math_documents(count: int, seed: int) -> list[Document]:
    """``count`` generated arithmetic word problems, several per document."""
    rng = random.Random(seed)
    docs = []
    for index in range(count):
        problems = [_word_problem(rng) for _ in range(rng.randint(3, 6))]
        docs.append(Document("math", f"problem-set-{index}", "\n\n".join(problems)))
    return docs


def split_documents(docs: list[Document], heldout_fraction: float, min_heldout: int = 3) -> tuple[list[Document], list[Document]]:
    """Deterministically split ``docs`` into (train, held_out) by hashing document ids."""
    ranked = sorted(docs, key=lambda doc: _stable_hash(f"{doc.domain}/{doc.doc_id}"))
    n_heldout = max(min_heldout, round(len(docs) * heldout_fraction))
    heldout_ids = {doc.doc_id for doc in ranked[:n_heldout]}
    train = [doc for doc in docs if doc.doc_id not in heldout_ids]
    heldout = [doc for doc in docs if doc.doc_id in heldout_ids]
    return train, heldout


@dataclass(frozen=True)
class CorpusConfig:
    """How much of each domain to read, and the held-out split."""

    code_chars: int = 3_000_000
    prose_chars: int = 1_000_000
    legal_chars: int = 1_000_000
    math_documents: int = 3_000
    heldout_fraction: float = 0.05
    seed: int = 0


@functools.lru_cache(maxsize=2)
def build_corpus(config: CorpusConfig) -> dict[str, tuple[list[Document], list[Document]]]:
    """Return ``{domain: (train_docs, heldout_docs)}`` for the four zoo domains."""
    by_domain = {
        "code": code_documents(config.code_chars),
        "prose": prose_documents(config.prose_chars),
        "legal": legal_documents(config.legal_chars),
        "math": math_documents(config.math_documents, config.seed),
    }
    return {domain: split_documents(docs, config.heldout_fraction) for domain, docs in by_domain.items()}


@functools.lru_cache(maxsize=4)
def corpus_digest(config: CorpusConfig) -> str:
    """A hash of the text ``config`` reads on this installation (every document's domain, id and content).

    The same settings read different text on different installations: ``legal`` takes the licences of whatever
    distributions are installed (a ``.[dev]`` install adds some), ``code`` and ``prose`` the standard library of
    the Python at hand. A zoo build's key includes this digest, so two installations never share a build (or
    prompts) under one key unless they read the same text.
    """
    digest = hashlib.sha256()
    for domain, (train, heldout) in sorted(build_corpus(config).items()):
        for doc in (*train, *heldout):
            digest.update(f"{domain}\0{doc.doc_id}\0{_stable_hash(doc.text):016x}\n".encode())
    return digest.hexdigest()[:16]


def heldout_prompts(domain: str, count: int, prompt_chars: int = 320, config: CorpusConfig | None = None) -> list[str]:
    """``count`` prompts cut from held-out documents of ``domain`` (deterministic)."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown zoo domain {domain!r}; choose one of {', '.join(DOMAINS)}")
    config = config or CorpusConfig()
    corpus = build_corpus(config)
    _, heldout = corpus[domain]
    rng = random.Random(f"{config.seed}/{domain}/prompts")
    prompts: list[str] = []
    attempts = 0
    while len(prompts) < count and attempts < count * 50:
        attempts += 1
        doc = heldout[attempts % len(heldout)]
        if domain == "math":
            problems = doc.text.split("\n\n")
            problem = problems[rng.randrange(len(problems))]
            prompts.append(problem.split("\nAnswer:")[0] + "\nAnswer:")
            continue
        lines = doc.text.splitlines(keepends=True)
        start = rng.randrange(max(1, len(lines) - 5))
        text = "".join(lines[start:])[:prompt_chars]
        cut = text.rfind("\n")
        text = text[: cut + 1] if cut > prompt_chars // 2 else text
        if len(text.strip()) >= 40 and text not in prompts:
            prompts.append(text)
    return prompts
