"""The original's operations timeline (docs/data.md section 9) as per-day phase labels."""

from __future__ import annotations

from typing import Tuple

import numpy as np

PHASE_NAMES: Tuple[str, ...] = (
    "southern_offensive",
    "northeastern_offensive",
    "northern_offensive",
    "donbas_offensive",
    "ukrainian_counteroffensive",
    "bakhmut_campaign",
    "2023_counteroffensive",
    "avdiivka_campaign",
    "2024_russian_offensive",
    "kursk_operation",
    "baseline",
)
PHASE_TO_INDEX = {name: i for i, name in enumerate(PHASE_NAMES)}
BASELINE = PHASE_TO_INDEX["baseline"]

# (operation, start, end inclusive or None = open, phase), in the original's dict order:
# the primary phase of a day is the last active operation in this order.
MAJOR_OPERATIONS = (
    ("Battle of Kyiv", "2022-02-24", "2022-04-02", "northern_offensive"),
    ("Battle of Kharkiv", "2022-02-24", "2022-05-14", "northeastern_offensive"),
    ("Siege of Mariupol", "2022-02-24", "2022-05-20", "southern_offensive"),
    ("Battle of Sievierodonetsk", "2022-05-06", "2022-06-25", "donbas_offensive"),
    ("Kharkiv Counteroffensive", "2022-09-06", "2022-10-02", "ukrainian_counteroffensive"),
    ("Kherson Counteroffensive", "2022-08-29", "2022-11-11", "ukrainian_counteroffensive"),
    ("Battle of Bakhmut", "2022-08-01", "2023-05-20", "bakhmut_campaign"),
    ("2023 Ukrainian Counteroffensive", "2023-06-04", "2023-10-31", "2023_counteroffensive"),
    ("Battle of Avdiivka", "2023-10-10", "2024-02-17", "avdiivka_campaign"),
    ("2024 Kharkiv Offensive", "2024-05-10", "2024-06-30", "2024_russian_offensive"),
    ("Kursk Incursion", "2024-08-06", None, "kursk_operation"),
)


def phase_timeline(start: str, end: str, operations=MAJOR_OPERATIONS):
    """Per-day (dates, phase_index, is_transition, n_active) for ``start..end`` inclusive.

    The first day counts as a transition, as in the original's label file.
    """
    dates = np.arange(np.datetime64(start, "D"), np.datetime64(end, "D") + 1)
    phase = np.full(len(dates), BASELINE, dtype=np.int32)
    n_active = np.zeros(len(dates), dtype=np.int32)
    for _, s, e, ph in operations:
        active = dates >= np.datetime64(s, "D")
        if e is not None:
            active &= dates <= np.datetime64(e, "D")
        phase[active] = PHASE_TO_INDEX[ph]
        n_active += active
    trans = np.ones(len(dates), dtype=bool)
    trans[1:] = phase[1:] != phase[:-1]
    return dates, phase, trans, n_active
