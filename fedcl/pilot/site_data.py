"""The proof of concept's site data: each site's own copy of its file, given one per site or split from one file."""

from __future__ import annotations

import csv
import json
import random
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from fedcl.pilot.errors import PilotError
from fedcl.pilot.node_config import DATA_SUFFIXES
from fedcl.pilot.secret_files import refuse_existing

MIN_RECORDS = 2  # a site needs at least a training and a test record


def _check_source(path: Path) -> Path:
    if not path.is_file():
        raise PilotError(f"--data {path}: no such file; give a .csv or .jsonl file with a text and a label column")
    if path.suffix.lower() not in DATA_SUFFIXES:
        raise PilotError(f"--data {path}: use a .csv or .jsonl file")
    return path


def read_records(path: Path) -> tuple[list[str] | None, list]:
    """A data file's records: for CSV its header and rows (quoted newlines kept), for JSONL ``None`` and raw lines."""
    if path.suffix.lower() == ".jsonl":
        return None, [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long answers (MedQuAD) exceed the 128 KiB default
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    if not rows:
        raise PilotError(f"--data {path} is empty; it needs a header line and records")
    return rows[0], rows[1:]


def write_records(path: Path, header: list[str] | None, records: Sequence) -> None:
    """Write records read by :func:`read_records` back in the same format."""
    if header is None:
        path.write_text("".join(f"{line}\n" for line in records), encoding="utf-8")
        return
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(records)


def split_file(source: Path, targets: Sequence[Path], seed: int = 0, max_records: int = 0) -> list[int]:
    """Shuffle ``source``'s records (seeded), deal them round-robin into ``targets``; return each one's count.

    ``max_records`` > 0 keeps at most that many records per target.
    """
    header, records = read_records(source)
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    counts = []
    for index, target in enumerate(targets):
        share = [records[i] for i in order[index :: len(targets)]]
        share = share[:max_records] if max_records > 0 else share
        if len(share) < MIN_RECORDS:
            raise PilotError(
                f"--data {source}: {len(records)} records cannot give {len(targets)} sites {MIN_RECORDS} or more each"
            )
        write_records(target, header, share)
        counts.append(len(share))
    return counts


def place_site_data(
    sources: Sequence[Path], folders: Sequence[Path], force: bool = False, seed: int = 0, max_records: int = 0
) -> list[Path]:
    """Give each site folder its own data file ``train<.csv|.jsonl>``; return the files' paths.

    One source per site: each is copied into its site's folder. One source
    for several sites: it is shuffled (``seed``) and split round-robin.
    ``max_records`` > 0 keeps a seeded sample of at most that many records per
    site. An existing file is kept unless ``force`` (:class:`PilotError` names it).
    """
    if max_records < 0:
        raise PilotError(f"--max-records {max_records}: use 0 (every record) or a positive number per site")
    sources = [_check_source(Path(path)) for path in sources]
    if len(sources) not in (1, len(folders)):
        raise PilotError(
            f"{len(sources)} --data files for {len(folders)} sites: give one file per site, or one file to split"
        )
    suffixes = {path.suffix.lower() for path in sources}
    if len(suffixes) != 1:
        raise PilotError("--data files mix .csv and .jsonl; give files of one format")
    suffix = sources[0].suffix.lower()
    targets = [Path(folder) / f"train{suffix}" for folder in folders]
    refuse_existing(targets, force)
    for folder in folders:
        Path(folder).mkdir(parents=True, exist_ok=True)
    if len(sources) == 1 and len(folders) > 1:
        split_file(sources[0], targets, seed, max_records)
    else:
        for source, target in zip(sources, targets):
            if max_records > 0:
                split_file(source, [target], seed, max_records)
            else:
                shutil.copyfile(source, target)
    return targets


def label_values(path: Path, label_column: str) -> list[str]:
    """The distinct values of ``label_column`` in a data file, sorted (the proof of concept's label set).

    Raises :class:`PilotError` if the column is missing.
    """
    header, records = read_records(path)
    if header is None:
        values = {str(json.loads(line).get(label_column, "")) for line in records}
        if values == {""}:
            raise PilotError(f"{path}: no '{label_column}' field; name the label column with --label-column")
        return sorted(values - {""})
    if label_column not in header:
        raise PilotError(
            f"{path}: no column '{label_column}' (columns: {', '.join(header)}); name it with --label-column"
        )
    column = header.index(label_column)
    return sorted({row[column] for row in records if len(row) > column and row[column]})
