"""Turning the engine's unit-named numbers into short text for the screens."""

from __future__ import annotations

import math

from elite_core import units

GIB = 1024**3
MIB = 1024**2


def format_bytes(count: float | int | None) -> str:
    return "-" if count is None else units.format_bytes(count)


def format_gib(count: float | int | None) -> str:
    """Fixed GiB unit, so a column of numbers lines up and compares at a glance."""
    if count is None:
        return "-"
    return f"{count / GIB:.1f}"


def bytes_to_gib(count: float | int) -> float:
    return count / GIB


def format_tokens(count: int | None) -> str:
    if count is None:
        return "-"
    if count >= 1024 and count % 1024 == 0:
        return f"{count // 1024}K"
    if count >= 1_000_000:
        return f"{count / 1_000_000:.1f}M"
    if count >= 10_000:
        return f"{count / 1000:.0f}k"
    return f"{count:,}"


def format_count(count: int | None) -> str:
    return "-" if count is None else f"{count:,}"


def format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "-"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def format_loss(loss: float | None) -> str:
    if loss is None or not math.isfinite(loss):
        return "-"
    return f"{loss:.4f}"


def format_lr(lr: float | None) -> str:
    return "-" if lr is None else f"{lr:.2e}"


def format_rate(tokens_per_s: float | None) -> str:
    if tokens_per_s is None or not math.isfinite(tokens_per_s):
        return "-"
    if tokens_per_s >= 10_000:
        return f"{tokens_per_s / 1000:.1f}k tok/s"
    return f"{tokens_per_s:,.0f} tok/s"


def format_value(name: str, value: object) -> str:
    """Format a dataclass field by the unit its name carries."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        if name.endswith("_bytes"):
            return format_bytes(value)
        if name.endswith("_s") or name.endswith("_seconds"):
            return format_duration(value) if value >= 1 else f"{value * 1000:.1f} ms"
        if name.endswith("_tokens"):
            return format_tokens(int(value))
        if isinstance(value, float):
            return f"{value:,.1f}" if abs(value) >= 10 else f"{value:.3g}"
        return f"{value:,}"
    return str(value)


def humanize_name(name: str) -> str:
    """`memory_total_bytes` -> `memory total`: the unit moves into the value."""
    for suffix in ("_bytes", "_seconds", "_s"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name.replace("_", " ")
