"""Shared CLI plumbing: clear one-line errors (exit code 2), settings, output formats."""

from __future__ import annotations

import csv
import io
import json
import re
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import pyarrow as pa
from rich.console import Console
from rich.markup import escape
from rich.table import Table

console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])


class UsageError(Exception):
    """Unusable arguments or input: printed as one line, exit code 2."""


# Characters that must not reach a terminal raw: C0/C1 controls, DEL, bidi overrides and isolates.
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069\ufeff]")
MAX_ERROR_CHARS = 1000


def one_line(message: str, limit: int = MAX_ERROR_CHARS) -> str:
    """An error message as one printable line: line breaks and runs of blanks become one space,
    other control characters are shown escaped, and an overlong message is cut."""
    text = " ".join(message.split())
    text = _UNPRINTABLE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
    return text if len(text) <= limit else text[:limit] + " ..."


def clear_errors(fn: F) -> F:
    """Turn expected failures into one line on stderr and exit code 2, never a traceback."""
    from warehouse import WarehouseError

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (UsageError, WarehouseError, FileNotFoundError, ValueError) as e:
            # escape(): text from the input (a column name such as "[/x]") is not Rich markup.
            err_console.print(f"[bold red]error:[/] {escape(one_line(str(e)))}", highlight=False, soft_wrap=True)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]


# A cell starting with one of these is run as a formula by Excel, LibreOffice and Google Sheets
# (OWASP "CSV injection"); report text is untrusted input, so such text cells get a leading "'".
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> Any:
    """A value as written to CSV: text that a spreadsheet would run as a formula is defused."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def print_arrow(table: pa.Table, fmt: str = "table", title: str | None = None) -> None:
    rows = table.to_pylist()
    if fmt == "json":
        sys.stdout.write(json.dumps(rows, default=str, indent=None) + "\n")
    elif fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow([csv_cell(c) for c in table.column_names])
        for r in rows:
            w.writerow([csv_cell(r[c]) for c in table.column_names])
        sys.stdout.write(buf.getvalue())
    elif fmt == "table":
        t = Table(title=title)
        for c in table.column_names:
            t.add_column(c)
        for r in rows:
            t.add_row(*("" if r[c] is None else str(r[c]) for c in table.column_names))
        console.print(t)
    else:
        raise UsageError(f"unknown format {fmt!r}: use table, csv or json")
