"""Small formatting helpers for values that carry their unit in their name (bytes, seconds, tokens)."""

from __future__ import annotations

import math

GIB = 1024**3
MIB = 1024**2
KIB = 1024

_BYTE_UNITS = (("TiB", 1024**4), ("GiB", GIB), ("MiB", MIB), ("KiB", KIB))


def format_bytes(n: int | float, digits: int = 1) -> str:
    """Binary units, as nvidia-smi and torch report them: 12.3 GiB, 512.0 MiB, 17 B."""
    value = float(n)
    sign = "-" if value < 0 else ""
    value = abs(value)
    for unit, size in _BYTE_UNITS:
        if value >= size:
            return f"{sign}{value / size:.{digits}f} {unit}"
    return f"{sign}{int(value)} B"


def gib(n: int | float) -> float:
    return float(n) / GIB


def format_tokens(n: int) -> str:
    """Token counts as the tier table writes them: 4K, 262K, 1.5M, 512."""
    if n >= 1024 * 1024 and n % (1024 * 1024) == 0:
        return f"{n // (1024 * 1024)}M"
    if n >= 1024 and n % 1024 == 0:
        return f"{n // 1024}K"
    if n >= 1000:
        return f"{n / 1024:.1f}K"
    return str(n)


def format_duration(seconds: float) -> str:
    """0.42 s, 12.3 s, 4 min 05 s, 2 h 03 min."""
    if seconds < 60:
        return f"{seconds:.2f} s" if seconds < 10 else f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def format_coarse_duration(seconds: float) -> str:
    """The two largest units, for times planned in hours or days: 45 s, 12 m 30 s, 3 h 20 m, 5 d 4 h; "-" if unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "-"
    whole = int(round(seconds))
    if whole < 60:
        return f"{whole} s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes} m {secs} s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours} h {minutes} m"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h"


def format_flops(tflops: float) -> str:
    """Rates in TFLOP/s, falling back to GFLOP/s for CPUs."""
    if tflops >= 1.0:
        return f"{tflops:.1f} TFLOP/s"
    return f"{tflops * 1000:.1f} GFLOP/s"
