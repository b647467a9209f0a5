"""Class prompt files (one prompt per line, or the 'label' / 'name' column of a headed CSV/TSV), read and checked.

Light (no torch): `service.predict` reads --classes-file / --descriptions-file before it loads a model.
"""

from __future__ import annotations

import csv
from pathlib import Path

from trainers.errors import InputError


def read_prompt_file(path: str | Path, expected_count: int | None = None, first: int | None = None) -> list[str]:
    """Read prompts: one per line, or the 'label'/'name' column of a .csv/.tsv with a header.

    first=N keeps the first N prompts (rows) only, as the official TDSM code reads the first 60 rows of the
    NTU-120 files for NTU-60; a file with fewer is an error. expected_count is checked after that cut.
    """
    if first is not None and first < 1:
        raise InputError(f"first={first}: the number of prompts to read must be >= 1")
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: prompt file not found")
    # utf-8-sig: tolerate the byte-order mark spreadsheet tools put in front of CSV exports.
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}); "
                         "save it as UTF-8") from None
    if path.suffix.lower() in (".csv", ".tsv"):
        prompts = _read_table_prompts(path, text)
    else:
        prompts = _read_line_prompts(path, text)
    if not prompts:
        raise InputError(f"{path}: no prompts")
    if first is not None:
        if len(prompts) < first:
            raise InputError(f"{path}: {len(prompts)} prompts, fewer than the first {first} asked for "
                             "(text.num_classes)")
        prompts = prompts[:first]
    if expected_count is not None and len(prompts) != expected_count:
        raise InputError(f"{path}: {len(prompts)} prompts, expected {expected_count} (one per class)")
    return prompts


def _read_line_prompts(path: Path, text: str) -> list[str]:
    """One prompt per line; trailing blank lines are ignored, any other blank line is an error."""
    lines = [line.strip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    for number, line in enumerate(lines, start=1):
        if not line:
            # A blank line in the middle would shift every later prompt to the wrong class.
            raise InputError(f"{path}:{number}: empty line inside the prompt list")
    return lines


def _read_table_prompts(path: Path, text: str) -> list[str]:
    """The 'label' (preferred) or 'name' column of a headed CSV/TSV."""
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    rows = list(csv.reader(text.splitlines(), delimiter=delimiter))
    while rows and not any(cell.strip() for cell in rows[-1]):
        rows.pop()
    if not rows:
        return []
    header = [cell.strip() for cell in rows[0]]
    column = next((c for c in ("label", "name") if c in header), None)
    if column is None:
        raise InputError(f"{path}: header {header} has no 'label' or 'name' column")
    index = header.index(column)
    prompts = []
    for number, row in enumerate(rows[1:], start=2):
        value = row[index].strip() if index < len(row) else ""
        if not value:
            raise InputError(f"{path}:{number}: empty {column!r} value")
        prompts.append(value)
    return prompts
