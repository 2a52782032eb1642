"""The user's own data: tables read from CSV, TSV, JSON and JSONL files or from a hub dataset, column detection,
and the seeded held-out split that stands in for a validation set the user did not give.

Files are read here, with Python's csv and json modules, into `datasets.Dataset`s: every bad file becomes one
line that names the file, the place in it and the fix. Nothing here knows a task or a method.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from adalora_cli.errors import UserError

TABLE_FORMATS = (".csv", ".tsv", ".json", ".jsonl")


def read_table(path: Path) -> dict[str, list]:
    """The rows of a table file as columns, by extension: .csv (quoted fields allowed), .tsv (tab-separated, no
    quoting, as GLUE ships them), .json (a list of objects, or one object holding such a list) or .jsonl."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in TABLE_FORMATS:
        raise UserError(f"{path}: unknown file type {suffix or '(none)'}; use one of {', '.join(TABLE_FORMATS)}")
    if not path.is_file():
        raise UserError(f"{path} does not exist; check the file option")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); re-save it as UTF-8") from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from None
    rows = _json_rows(path, text) if suffix in (".json", ".jsonl") else _delimited_rows(path, text, suffix)
    if not rows:
        raise UserError(f"{path} holds no rows; it needs a header (or keys) and at least one example")
    columns = list(rows[0])
    for i, row in enumerate(rows):
        if list(row) != columns:
            missing = sorted(set(columns) - set(row))
            where = f"row {i + 1}" if suffix in (".json", ".jsonl") else f"line {i + 2}"
            raise UserError(f"{path} {where} has the fields {sorted(row)}, not those of the first row "
                            f"({sorted(columns)}){'; it lacks ' + ', '.join(missing) if missing else ''}; fix that row")
    return {name: [row[name] for row in rows] for name in columns}


def _delimited_rows(path: Path, text: str, suffix: str) -> list[dict[str, Any]]:
    stream = io.StringIO(text, newline="")
    if suffix == ".tsv":
        reader = csv.reader(stream, delimiter="\t", quoting=csv.QUOTE_NONE)
    else:
        reader = csv.reader(stream)  # quoted fields may hold commas and line breaks
    header, rows = None, []
    try:
        for line in reader:
            if not line:
                continue
            if header is None:
                header = [h.strip() for h in line]
                if len(set(header)) != len(header) or not all(header):
                    raise UserError(f"{path}: the header {header} has empty or repeated column names; name every "
                                    "column once")
                continue
            if len(line) != len(header):
                raise UserError(f"{path} line {reader.line_num} has {len(line)} field(s), the header has "
                                f"{len(header)}; fix that row" + (" (quote fields that hold commas)" if suffix == ".csv"
                                                                   else ""))
            rows.append(dict(zip(header, line)))
    except csv.Error as exc:
        raise UserError(f"{path} line {reader.line_num} is not valid CSV ({exc}); fix the quoting") from None
    return rows


def _json_rows(path: Path, text: str) -> list[dict[str, Any]]:
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None  # many ".json" files are JSON lines
        if data is not None:
            if isinstance(data, dict):
                lists = [v for v in data.values() if isinstance(v, list)]
                if len(lists) != 1:
                    raise UserError(f"{path} holds an object; give a list of row objects (or an object with one such "
                                    "list, or JSON lines)")
                data = lists[0]
            if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
                raise UserError(f"{path} must hold a list of row objects ({{\"text\": ..., \"label\": ...}})")
            return data
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path} line {number} is not valid JSON ({exc.msg}); write one object per line") from None
        if not isinstance(row, dict):
            raise UserError(f"{path} line {number} is not a JSON object; write one {{...}} per line")
        rows.append(row)
    return rows


ID_COLUMNS = ("id", "idx", "index", "Index")


def row_ids(columns: dict[str, list]) -> list:
    """Each row's id: the table's id / idx / index column when it has one, else the row number (0-based)."""
    name = next((c for c in ID_COLUMNS if c in columns), None)
    return list(columns[name]) if name else list(range(len(next(iter(columns.values()), []))))


def to_dataset(columns: dict[str, list]):
    import datasets

    return datasets.Dataset.from_dict(columns)


def load_hub_dataset(name: str, config: str | None, split: str):
    """One split of a hub dataset; a failure (offline, unknown name or split) is one line."""
    import datasets

    try:
        return datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # the hub client raises many types when offline or a name is wrong
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load split {split!r} of dataset {name}{f' ({config})' if config else ''} from the "
                        f"hub ({first[:200]}); check --dataset, --dataset-config and the split names, or pass "
                        "--train-file") from None


def hub_split_names(name: str, config: str | None) -> list[str]:
    import datasets

    try:
        return list(datasets.get_dataset_split_names(name, config))
    except Exception:  # offline or unknown: the split load itself reports the problem
        return []


def pick_column(found: list[str], given: str | None, candidates: tuple[str, ...], what: str, flag: str,
                source: str, required: bool = True, taken: tuple[str | None, ...] = ()) -> str | None:
    """The column to use for `what`: the one given (which must exist), else the first candidate present that is
    not `taken` (already named or picked for another role: `--text-column sentence2` is not also the pair)."""
    if given is not None:
        if given not in found:
            raise UserError(f"{source} has no column {given!r} (columns: {', '.join(found)}); pick one with {flag}")
        return given
    for name in candidates:
        if name in found and name not in taken:
            return name
    if required:
        raise UserError(f"{source} has no {what} column ({' / '.join(candidates)}; columns: {', '.join(found)}); "
                        f"pick one with {flag}")
    return None


def held_out_split(raw, fraction: float, seed: int, group_columns: tuple[str, ...] = ()):
    """(training rows, held-out rows): a seeded share `fraction` of `raw` set aside for evaluation.

    Rows with the same values in `group_columns` (the task's input: a text, a pair, a source with several
    references, a SQuAD article) go to one side together, so no held-out input was trained on; the share is a
    share of those groups. Without `group_columns`, or when no input repeats, each row is its own group, which
    gives the same split as shuffling the rows.
    """
    import numpy as np

    keys = list(zip(*(raw[c] for c in group_columns))) if group_columns else list(range(len(raw)))
    groups = list(dict.fromkeys(keys))
    n_eval = max(1, round(fraction * len(groups)))
    if n_eval >= len(groups):
        what = f"distinct {' + '.join(group_columns)} value(s)" if group_columns else "training row(s)"
        raise UserError(f"{len(groups)} {what} are too few to hold out {fraction:.0%} for evaluation; give a "
                        "--validation-file")
    order = np.random.default_rng(seed).permutation(len(groups))
    held = {groups[i] for i in order[:n_eval]}
    keep = [i for i, key in enumerate(keys) if key not in held]
    evaluate = [i for i, key in enumerate(keys) if key in held]
    return raw.select(keep), raw.select(evaluate)
