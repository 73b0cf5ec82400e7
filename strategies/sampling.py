"""Turning logits into the distribution a strategy samples from, greedy or with temperature."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Sampling:
    """Decoding settings shared by every strategy: ``temperature`` 0 means greedy."""

    temperature: float = 0.0
    generator: torch.Generator | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Probabilities (float32) the sampler draws from for ``logits`` (``[..., vocab]``)."""
        if self.greedy:
            return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
        return torch.softmax(logits.float() / self.temperature, dim=-1)

    def pick(self, logits: torch.Tensor) -> int:
        """One token from the last-axis ``logits`` of a single position."""
        if self.greedy:
            return int(logits.argmax(-1))
        return self.draw(self.probs(logits))

    def choose(self, probs: torch.Tensor) -> int:
        """One token from a distribution returned by ``probs`` (its argmax when greedy)."""
        return int(probs.argmax(-1)) if self.greedy else self.draw(probs)

    def draw(self, probs: torch.Tensor) -> int:
        """One token drawn from ``probs`` with this run's generator."""
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def uniform(self, device: torch.device) -> float:
        """A uniform [0, 1) number from this run's generator."""
        return float(torch.rand((), generator=self.generator, device=device))
