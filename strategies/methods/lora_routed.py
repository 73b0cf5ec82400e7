"""SpecuLoRA-style LoRA-routed drafts: a router picks a domain adapter for the draft, then speculative decoding.

All domain adapters sit in one ``PeftModel`` over the draft, loaded once per
worker; a prompt only switches the active adapter (``set_adapter``). Routing
(decoding the prompt and classifying it) happens inside ``generate``, so its
time counts in the strategy's wall time. The ``arm`` parameter gives the
comparison rows: ``routed`` (the router's choice), ``oracle`` (the prompt's
true domain, its category), ``wrong`` (a domain other than the true one),
``none`` (the plain draft, adapters off). Adapters may cover only some domains
(e.g. those a general draft never saw); prompts of the others are drafted by the
plain draft under ``routed`` and ``oracle``, and by an adapter under ``wrong``.
Adapters touch only the draft, so the output is the target's own (lossless).

At batch size B > 1 each row is routed on its own prompt and the draft runs
every row under its own adapter (or none) in one batched pass, with peft's
per-row ``adapter_names``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pandas as pd

from harness.core.batched_lm import BatchedCausalLM, BatchPrefill
from harness.core.errors import ConfigError
from harness.core.tables import ReportView, fmt, markdown_table, params_label
from strategies.base import ModelSet, Strategy, StrategyParams, Trace
from strategies.batched_engine import BatchCapable, BatchProposer
from strategies.methods.speculative import BatchedDraftProposer, Speculative, SpeculativeParams
from strategies.registry import register
from strategies.sampling import Sampling

ARMS = ("routed", "oracle", "wrong", "none")


@dataclass(frozen=True)
class LoraRoutedParams(StrategyParams):
    """``adapters`` and ``router``: names in the sweep's ``train`` section; ``arm``: which adapter drafts."""

    adapters: str
    router: str = ""
    arm: str = "routed"
    gamma: int = 4

    def problems(self, where: str) -> Iterator[ConfigError]:
        if self.arm not in ARMS:
            yield ConfigError(f"{where}.arm", f"unknown arm {self.arm!r}", f"choose one of {', '.join(ARMS)}")
        if self.arm == "routed" and not self.router:
            yield ConfigError(f"{where}.router", "the routed arm needs a router", "name a router from the train section")
        if self.gamma < 1:
            yield ConfigError(f"{where}.gamma", f"must be >= 1, got {self.gamma}")

    def uses_artifacts(self) -> list[str]:
        return [self.adapters] + ([self.router] if self.arm == "routed" else [])


def lora_arms_section(view: ReportView) -> list[str]:
    """SpecuLoRA: each arm's α and wall speedup per prompt set, and routed against none in both."""
    groups = view.groups
    lora = groups[groups["strategy"] == "lora_routed"]
    if lora.empty:
        return []
    lora = lora.assign(arm=lora["params_raw"].map(lambda raw: raw.get("arm", "routed")),
                       setting=lora["params_raw"].map(lambda raw: params_label(
                           {key: value for key, value in raw.items() if key != "arm"})))
    rows = []
    for (target, setting, prompt_set), group in lora.groupby(["target", "setting", "prompt_set"], sort=True):
        arms = {row.arm: row for row in group.itertuples()}
        row = {"target": target, "setting": setting, "prompt_set": prompt_set}
        for arm in ("none", "routed", "oracle", "wrong"):
            if arm in arms:
                row[f"{arm}_alpha"] = fmt(arms[arm].alpha)
                row[f"{arm}_speedup"] = fmt(arms[arm].speedup)
        if "none" in arms and "routed" in arms:
            row["routed_vs_none"] = (f"α {arms['routed'].alpha - arms['none'].alpha:+.3f}, "
                                     f"wall {arms['routed'].speedup / arms['none'].speedup:.2f}x")
        rows.append(row)
    frame = pd.DataFrame(rows)
    columns = {"prompt_set": "prompt set"}
    if frame["target"].nunique() > 1:
        columns = {"target": "target", **columns}
    if frame["setting"].nunique() > 1:
        columns["setting"] = "params"
    for arm in ("none", "routed", "oracle", "wrong"):
        if f"{arm}_alpha" in frame:
            columns[f"{arm}_alpha"] = f"α {arm}"
            columns[f"{arm}_speedup"] = f"speedup {arm}"
    if "routed_vs_none" in frame:
        columns["routed_vs_none"] = "routed against none"
    return ["## SpecuLoRA arms", "",
            "α and wall speedup of each adapter arm; routed against none as the α difference and the ratio of "
            "their speedups (each paired against its own baseline).", "",
            markdown_table(frame.fillna("-"), columns), ""]


BASE_ROW = "__base__"  # peft's per-row adapter name for "no adapter"


class RoutedDraftProposer(BatchedDraftProposer):
    """``BatchedDraftProposer`` over the adapted draft, each row drafting with the adapter its prompt routes to
    (peft's per-row ``adapter_names``; a row routed to no adapter uses the plain draft)."""

    def __init__(self, strategy: "LoraRouted", adapters: Any) -> None:
        super().__init__(BatchedCausalLM.of(adapters.lm), strategy.params.gamma)
        self.strategy, self.adapters = strategy, adapters
        self.domains: list[str | None] = []

    def begin(self, prompts: list[list[int]], prefill: BatchPrefill) -> None:
        self.domains = [self.strategy.domain_for(prompt, self.adapters.domains) for prompt in prompts]
        self.adapters.activate(self.adapters.domains[0])  # adapter layers on: each row then names its own
        self.draft.forward_kwargs = {"adapter_names": [domain or BASE_ROW for domain in self.domains]}
        super().begin(prompts, prefill)

    def row_extras(self, row: int) -> dict[str, Any]:
        return {"domain": self.domains[row]}


@register("lora_routed")
class LoraRouted(Strategy, BatchCapable):
    """Route the prompt to a domain LoRA on the draft, then draft ``gamma`` tokens and verify them."""

    Params = LoraRoutedParams
    report_section = staticmethod(lora_arms_section)

    def domain_for(self, prompt_ids: list[int], domains: list[str]) -> str | None:
        arm = self.params.arm
        if arm == "none":
            return None
        if arm == "routed":
            # A domain the router knows but no adapter was trained for drafts with the plain draft.
            routed = self.models.artifact(self.params.router).route(self.models.tokenizer.decode(prompt_ids))
            return routed if routed in domains else None
        true = self.prompt_category
        if true is None:
            raise ValueError(f"the {arm} arm needs prompts labelled with their domain (a prompt set's category)")
        if arm == "oracle":
            # A domain with no adapter of its own is drafted by the plain draft, as the router would do.
            return true if true in domains else None
        # wrong: the next adapter domain after the true one, or the first when the true domain has no adapter.
        return domains[(domains.index(true) + 1) % len(domains)] if true in domains else domains[0]

    def generate(self, prompt_ids: list[int], max_new_tokens: int, sampling: Sampling) -> Trace:
        adapters = self.models.artifact(self.params.adapters)
        domain = self.domain_for(prompt_ids, adapters.domains)
        adapters.activate(domain)
        models = ModelSet(target=self.models.target, drafts={"lora": adapters.lm}, tokenizer=self.models.tokenizer)
        trace = Speculative(SpeculativeParams(draft="lora", gamma=self.params.gamma), models).generate(
            prompt_ids, max_new_tokens, sampling)
        trace.extras["domain"] = domain
        return trace

    def batch_proposer(self) -> BatchProposer:
        return RoutedDraftProposer(self, self.models.artifact(self.params.adapters))
