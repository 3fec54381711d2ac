"""Small per-site CSVs for pilot tests, cut from the shared MedQuAD file (real biomedical text, offline)."""

from __future__ import annotations

import csv
import random
import sys
from pathlib import Path

import pytest

MEDQUAD = Path(__file__).resolve().parents[2] / "shared" / "data" / "medquad" / "medquad.csv"
LABELS = ("frequency", "genetic changes", "inheritance")  # three question types, 1,000+ answers each
FAST_RUN_CONFIG = 'recipe="probe-then-lora" probe-rounds=2 num-rounds=0 probe-steps=5 max-length=32'


def medquad_rows() -> list[dict[str, str]]:
    """MedQuAD's rows of the three LABELS question types; the test is skipped if the shared data is not there."""
    if not MEDQUAD.is_file():
        pytest.skip(f"the shared MedQuAD file is not at {MEDQUAD} (see ../shared/data/README.md)")
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with MEDQUAD.open(newline="", encoding="utf-8") as handle:
        return [row for row in csv.DictReader(handle) if row["qtype"] in LABELS]


def write_site_csvs(
    folder: Path, sites: int = 2, per_site: int = 40, seed: int = 1, max_chars: int = 400
) -> list[Path]:
    """Write ``sites`` disjoint CSVs (columns text,label) of ``per_site`` MedQuAD answers each into ``folder``."""
    rows = medquad_rows()
    random.Random(seed).shuffle(rows)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(sites):
        path = folder / f"site{index + 1}.csv"
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", "label"])
            for row in rows[index * per_site : (index + 1) * per_site]:
                writer.writerow([row["answer"][:max_chars], row["qtype"]])
        paths.append(path)
    return paths
