"""CSV lists of images (`path,label[,split]`), read as plain text rows: torch-free, so the
early class-count check and the readers share one parser."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from finetune.compose.safe_files import UnsafeFile, read_text

MAX_CSV_BYTES = 1 << 30


class CsvProblem(Exception):
    """A CSV list that cannot be read as path,label rows (the message says why)."""


SPLIT_NAMES = ("train", "val", "test")


def read_csv_rows(path: Path, allow_empty_label: bool = False) -> list[tuple[str, str]]:
    """The (path, label) rows of a CSV list (see read_csv_table)."""
    return [(p, label) for p, label, _ in read_csv_table(path, allow_empty_label)]


def read_csv_table(path: Path, allow_empty_label: bool = False
                   ) -> list[tuple[str, str, str]]:
    """The (path, label, split) rows of a CSV list: UTF-8 (a byte-order mark is fine), an
    optional `path,label[,split]` header, `#` comment lines and blank lines skipped; the
    optional third column says train, val or test (empty: train, or held out by
    data.val_fraction).

    Raises:
        CsvProblem: not UTF-8 text, not CSV, no rows, or rows without a path or a label;
            every bad row counted in one sentence.
    """
    try:
        text = read_text(path, MAX_CSV_BYTES, "data.root:")
    except UnsafeFile as err:
        raise CsvProblem(str(err)) from None
    try:
        rows = [(reader.line_num, r) for reader in [csv.reader(io.StringIO(text, newline=""))]
                for r in reader if r and not r[0].lstrip().startswith("#")]
    except csv.Error as err:
        raise CsvProblem(f"data.root: {path} is not a CSV list ({err}); write rows of "
                         "path,label") from None
    if rows and [c.strip().lower() for c in rows[0][1][:2]] in (["path", "label"],
                                                                 ["path", "labels"]):
        rows = rows[1:]
    bad_split = [n for n, r in rows if len(r) >= 3 and r[2].strip().lower() not in
                 ("", *SPLIT_NAMES)]
    short = [n for n, r in rows if len(r) < 2]
    no_path = [n for n, r in rows if len(r) >= 2 and not r[0].strip()]
    no_label = [] if allow_empty_label else [n for n, r in rows
                                             if len(r) >= 2 and not r[1].strip()]
    if not rows or short or no_path or no_label or bad_split:
        found = [f"{what} on line{'s' if len(lines) > 1 else ''} "
                 f"{', '.join(map(str, lines[:5]))}{' ...' if len(lines) > 5 else ''}"
                 for what, lines in (("fewer than two fields", short), ("no path", no_path),
                                     ("an empty label", no_label),
                                     ("a split other than train, val or test", bad_split))
                 if lines]
        raise CsvProblem(f"data.root: {path} needs rows of path,label; "
                         + ("; ".join(found) if found else "it has none")
                         + " (fix or remove those rows)" * bool(found))
    return [(r[0].strip(), r[1].strip(), r[2].strip().lower() if len(r) >= 3 else "")
            for _, r in rows]
