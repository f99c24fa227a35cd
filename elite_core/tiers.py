"""The seven context tiers the product offers: context window, target window, default LoRA rank."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Tier:
    number: int
    context_tokens: int
    """Tokens the model reads before the part it is trained to write."""
    target_tokens: int
    """Tokens at the end of each window that carry the loss."""
    default_lora_rank: int

    @property
    def total_tokens(self) -> int:
        return self.context_tokens + self.target_tokens

    @property
    def label(self) -> str:
        return f"{_short(self.context_tokens)}+{_short(self.target_tokens)}"


def _short(tokens: int) -> str:
    return f"{tokens // 1024}K" if tokens >= 1024 else str(tokens)


TIERS: tuple[Tier, ...] = (
    Tier(1, 4 * 1024, 512, 48),
    Tier(2, 8 * 1024, 2 * 1024, 32),
    Tier(3, 16 * 1024, 2 * 1024, 24),
    Tier(4, 32 * 1024, 4 * 1024, 12),
    Tier(5, 57 * 1024, 7 * 1024, 8),
    Tier(6, 131 * 1024, 16 * 1024, 8),
    Tier(7, 262 * 1024, 32 * 1024, 6),
)


def tier_by_number(number: int) -> Tier:
    for tier in TIERS:
        if tier.number == number:
            return tier
    raise ValueError(f"no tier {number}: tiers are 1..{len(TIERS)}")
