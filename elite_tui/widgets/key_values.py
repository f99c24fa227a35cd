"""Render any frozen engine dataclass as label/value lines, formatted by the units in its field names."""

from __future__ import annotations

import dataclasses
from typing import Any

from rich.table import Table

from elite_tui.format import format_value, humanize_name


def scalar_fields(obj: Any, skip: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    rows = []
    for field in dataclasses.fields(obj):
        value = getattr(obj, field.name)
        if field.name in skip or dataclasses.is_dataclass(value) or isinstance(value, (list, tuple, dict)):
            continue
        rows.append((humanize_name(field.name), format_value(field.name, value)))
    return rows


def key_value_table(rows: list[tuple[str, str]], key_width: int = 22) -> Table:
    table = Table.grid(padding=(0, 1))
    table.add_column(style="bold", width=key_width, no_wrap=True)
    table.add_column(overflow="fold")
    for key, value in rows:
        table.add_row(key, value)
    return table
