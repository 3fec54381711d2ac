"""Small per-site CSVs for pilot tests: real biomedical text from the shared MedQuAD file, offline.

Where ``../shared/data`` is not beside the checkout, the packaged BBC News
corpus (always installed) stands in, so the deployment tests still run.
"""

from __future__ import annotations

import csv
import random
import sys
from pathlib import Path

MEDQUAD = Path(__file__).resolve().parents[2] / "shared" / "data" / "medquad" / "medquad.csv"
MEDQUAD_LABELS = ("frequency", "genetic changes", "inheritance")  # three question types, 1,000+ answers each
BBC_LABELS = ("business", "sport", "tech")
LABELS = MEDQUAD_LABELS if MEDQUAD.is_file() else BBC_LABELS
FAST_RUN_CONFIG = 'recipe="probe-then-lora" probe-rounds=2 num-rounds=0 probe-steps=5 max-length=32'


def labelled_rows() -> list[tuple[str, str]]:
    """(text, label) rows of the three LABELS: MedQuAD's answers, or BBC News articles where MedQuAD is absent."""
    if MEDQUAD.is_file():
        csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
        with MEDQUAD.open(newline="", encoding="utf-8") as handle:
            return [(row["answer"], row["qtype"]) for row in csv.DictReader(handle) if row["qtype"] in LABELS]
    from fedcl.run_config import RunConfig
    from simulations.data_sources import load_dataset

    data = load_dataset(RunConfig())
    return [(text, data.label_names[y]) for text, y in zip(data.texts, data.labels) if data.label_names[y] in LABELS]


def write_site_csvs(
    folder: Path, sites: int = 2, per_site: int = 40, seed: int = 1, max_chars: int = 400
) -> list[Path]:
    """Write ``sites`` disjoint CSVs (columns text,label) of ``per_site`` records each into ``folder``."""
    rows = labelled_rows()
    random.Random(seed).shuffle(rows)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(sites):
        path = folder / f"site{index + 1}.csv"
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", "label"])
            for row in rows[index * per_site : (index + 1) * per_site]:
                writer.writerow([row[0][:max_chars], row[1]])
        paths.append(path)
    return paths
