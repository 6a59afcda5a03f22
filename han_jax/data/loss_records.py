"""Loader for the 2022-Ukraine-Russia-War-Dataset JSON files (real public daily loss data).

(Records of war losses; the training objectives are ``han_jax/tasks/``.)

``load_losses_world(directory, monthly_csv_dir=None)`` reads
``russia_losses_personnel.json`` and ``russia_losses_equipment.json`` and builds
the original's four daily sources (personnel 12, drones 9, armor 9, artillery 15)
with the same delta-feature engineering, plus the regime/transition targets from
the operations timeline (docs/data.md section 9). Everything it decides (late, stopped,
renamed or gapped fields, fallbacks) goes into ``World.report`` and the log.

Monthly inputs and the casualty / anomaly targets come from optional CSV files in
``monthly_csv_dir`` (see ``han_jax/data/README.md``):

* ``<source>.csv``: one monthly source per file, a ``date`` column
  (``YYYY-MM`` or ``YYYY-MM-DD``, mapped to the month start) plus numeric
  feature columns; empty cells are missing.
* ``targets_fatalities.csv``: ``date`` + ``fatalities`` (raw monthly counts).
* ``targets_viirs.csv``: ``date`` (daily) + ``radiance_mean``; the anomaly target
  is computed with the original's 8-row window rule.

Without monthly source CSVs the monthly inputs are monthly means of the daily loss
deltas (``personnel_monthly`` 4, ``equipment_monthly`` 8; a han-jax fallback, not
the original's sources). Without target CSVs those targets are marked invalid,
and when an ``hdx_conflict.csv`` with a ``fatalities`` column is given it also
serves as the casualty target (the original's leakage, reported).

Every numeric value is checked as it is read, before any feature work: a value
that is not finite (``NaN``, ``Infinity``, ``1e309``, the string ``"nan"``), negative,
or above :data:`MAX_CUMULATIVE` is a one-line ``DataError`` naming the file, field,
date and value; with ``implausible_values="clip"`` or ``"drop"`` (``DataConfig``) it
is clipped into range or dropped instead, with one report line each. A value that
is not a number inside a numeric field is dropped with one report line per record;
a field with no numeric value at all (``greatest losses direction``) is a text field,
reported once and not used.

Without ``directory`` the package's own snapshot is read (:func:`bundled_losses_dir`,
``han_jax/data/bundled/losses/README.md``).

Deliberate differences from the original: a field that never occurs keeps its
three (zero) features so the layout stays 12/9/9/15, and non-monotonic or
duplicate dates, implausible values, and malformed records raise ``DataError``
instead of being sorted, kept or dropped silently.
"""

from __future__ import annotations

import csv
import importlib.resources
import json
import math
import os
from typing import Dict, List, Optional, Tuple

import numpy as np

from han_jax.config import MONTHLY_SOURCES
from han_jax.data import features as fe
from han_jax.data.timeline import phase_timeline
from han_jax.data.world import (
    DataError,
    DayTargets,
    MissingFileError,
    MonthTargets,
    SourceTable,
    World,
    check_dates,
    month_start,
    note,
)

PERSONNEL_FILE = "russia_losses_personnel.json"
EQUIPMENT_FILE = "russia_losses_equipment.json"
TARGET_FATALITIES = "targets_fatalities.csv"
TARGET_VIIRS = "targets_viirs.csv"

# Known spellings of the counters the four sources use (after ' ' and '-' -> '_').
ALIASES: Dict[str, Tuple[str, ...]] = {
    "personnel": ("personnel",),
    "POW": ("POW", "pow"),
    "drone": ("drone", "UAV", "uav", "drones"),
    "cruise_missiles": ("cruise_missiles", "cruise_missile"),
    "tank": ("tank", "tanks"),
    "APC": ("APC", "apc", "AFV"),
    "field_artillery": ("field_artillery", "artillery_systems"),
    "MRL": ("MRL", "mrl", "MLRS"),
    "anti_aircraft_warfare": ("anti_aircraft_warfare", "air_defense_systems"),
    "mobile_SRBM_system": ("mobile_SRBM_system", "mobile_srbm_system"),
    "aircraft": ("aircraft",),
    "helicopter": ("helicopter",),
}
# Fields the dataset is known to have merged; reported, not used by the four sources.
KNOWN_RENAMES = {("military_auto", "fuel_tank"): "vehicles_and_fuel_tanks"}
USED_EQUIPMENT = ("drone", "cruise_missiles", "tank", "APC", "field_artillery", "MRL",
                  "anti_aircraft_warfare", "mobile_SRBM_system")

# Plausibility ceiling of every cumulative counter. The real data's largest value is personnel
# 1,207,910 on 2025-12-31 (the largest equipment counter, drone, is 97,684; the largest one-day
# increase of any counter is personnel's 3,160): 1e7 leaves about 8x headroom for newer files
# and still catches an exponent or unit slip (1e30, a count in the billions).
MAX_CUMULATIVE = 1e7
# A one-day spike: a rise this many times the field's typical (median) daily rise that falls back by at
# least half of it the next day. No cumulative counter of the bundled data comes near (its largest such
# ratio is 1.4, APC); a typo such as an extra digit on one day is hundreds to thousands.
SPIKE_RATIO = 20.0
# What the loader does with a value that fails the checks (DataConfig.implausible_values).
IMPLAUSIBLE_VALUES = ("error", "clip", "drop")
BUNDLED = ("bundled", "losses")


def _norm(name: str) -> str:
    return name.replace(" ", "_").replace("-", "_")


def bundled_losses_dir() -> str:
    """The snapshot of the two JSON files shipped inside the package: the default of ``--losses-dir``,
    so ``--data losses`` works from any clone, install and working directory."""
    path = importlib.resources.files("han_jax.data").joinpath(*BUNDLED)
    if not path.is_dir():
        raise MissingFileError(f"{path}: the bundled loss-record snapshot is missing from this installation; "
                               "expected it as package data (or pass --losses-dir)")
    return os.fspath(path)


def check_implausible_values(value) -> str:
    """The configured handling of implausible values; raises a one-line ``DataError`` for an unknown one."""
    if value not in IMPLAUSIBLE_VALUES:
        allowed = ", ".join(repr(v) for v in IMPLAUSIBLE_VALUES)
        raise DataError(f"DataConfig.implausible_values={value!r}; expected one of {allowed}")
    return value


def _load_records(path: str) -> list:
    """The file's JSON list of records (non-empty), or a one-line error naming the file."""
    if not os.path.exists(path):
        raise MissingFileError(f"{path}: file not found; expected the 2022-Ukraine-Russia-War-Dataset JSON here")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); expected a list of "
                        "daily records") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}); expected a JSON list of daily records") from None
    if not isinstance(data, list) or not data:
        raise DataError(f"{path}: expected a non-empty JSON list of daily records")
    return data


def _record_dates(data: list, path: str) -> np.ndarray:
    """Each record's ``date`` (strictly increasing), or an error naming the record."""
    dates = []
    for i, r in enumerate(data):
        if not isinstance(r, dict) or "date" not in r:
            raise DataError(f"{path}: record {i} has no 'date' field; expected {{'date': 'YYYY-MM-DD', ...}}")
        try:
            dates.append(np.datetime64(str(r["date"])[:10], "D"))
        except ValueError as e:
            raise DataError(f"{path}: record {i} has date {r['date']!r}; expected YYYY-MM-DD") from e
    dates = np.array(dates, dtype="datetime64[D]")
    check_dates(dates, path)
    return dates


def _as_number(v) -> Optional[float]:
    """A JSON number, or a string that spells one ("12", "nan"), as a float; None for anything else."""
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        try:
            return float(v)
        except OverflowError:  # an int too large for a float
            return math.inf
    if isinstance(v, str):
        try:
            return float(v.strip())
        except ValueError:
            return None
    return None


def _implausible(x: float) -> Optional[Tuple[str, str]]:
    """(what is wrong, what was expected) for a value no cumulative counter can have; None when plausible."""
    if not math.isfinite(x):
        return "not finite", "a finite number"
    if x < 0:
        return "negative", "non-negative cumulative counts"
    if x > MAX_CUMULATIVE:
        return (f"above the ceiling {MAX_CUMULATIVE:g}",
                f"at most {MAX_CUMULATIVE:g} (the plausibility ceiling of a cumulative count)")
    return None


def _show(v) -> str:
    """A record's value as the user would recognise it in the file."""
    if v is None:
        return "null"
    return repr(v) if isinstance(v, str) else f"{v:g}" if isinstance(v, float) else str(v)


def _checked(path: str, field: str, date, v, how: str, report: List[str]) -> Optional[float]:
    """One record's value of a numeric field after the checks; None when it is dropped (always reported)."""
    where = f"{os.path.basename(path)}: field '{field}' on {date}"
    x = _as_number(v)
    if x is None:
        note(report, f"{where} is {_show(v)}, not a number; that record's value is dropped "
                     "(missing: deltas 0 around it)")
        return None
    bad = _implausible(x)
    if bad is None:
        return x
    if how == "error":
        raise DataError(f"{path}: field '{field}' is {_show(v)} on {date}; expected {bad[1]} "
                        "(data.implausible_values=clip or drop repairs such values instead, with a report line)")
    if how == "clip" and not math.isnan(x):
        y = min(max(x, 0.0), MAX_CUMULATIVE)
        note(report, f"{where} is {_show(v)} ({bad[0]}); clipped to {y:g} (data.implausible_values=clip)")
        return y
    why = " (NaN cannot be clipped)" if how == "clip" else ""
    note(report, f"{where} is {_show(v)} ({bad[0]}); dropped{why}, missing: deltas 0 around it "
                 f"(data.implausible_values={how})")
    return None


def _repair_spikes(path: str, field: str, dates, x: np.ndarray, how: str, report: List[str]) -> None:
    """Finds one-day spikes of a cumulative counter (:data:`SPIKE_RATIO`) and applies ``how`` to them, in place.

    Below the ceiling a wrong value still moves a day's delta by millions (a personnel count
    of 9,000,000 for a day amid 1.2 million): ``error`` stops the load naming the file, field,
    date and value; ``clip`` lowers it to the higher of its neighbours (no rise that day);
    ``drop`` makes it missing. Each repair is a report line.
    """
    idx = np.flatnonzero(~np.isnan(x))
    if len(idx) < 3:
        return
    v = x[idx]
    rises = np.diff(v)
    typical = max(float(np.median(rises[rises > 0])) if np.any(rises > 0) else 1.0, 1.0)
    prev, cur, nxt = v[:-2], v[1:-1], v[2:]
    rise = cur - prev
    spike = (rise > SPIKE_RATIO * typical) & (cur - nxt > 0.5 * rise)
    where = f"{os.path.basename(path)}: field '{field}'"
    for j in np.flatnonzero(spike) + 1:
        i, value = idx[j], v[j]
        what = (f"{value:g} on {dates[i]}, a rise of {value - v[j - 1]:g} that falls back the next day "
                f"({(value - v[j - 1]) / typical:.0f}x its typical daily rise {typical:g})")
        if how == "error":
            raise DataError(f"{path}: field '{field}' is {what}; expected a cumulative count without one-day "
                            "spikes (data.implausible_values=clip or drop repairs it instead, with a report line)")
        if how == "clip":
            x[i] = max(v[j - 1], v[j + 1])
            note(report, f"{where} is {what}; clipped to {x[i]:g} (data.implausible_values=clip)")
        else:
            x[i] = np.nan
            note(report, f"{where} is {what}; dropped, missing: deltas 0 around it (data.implausible_values=drop)")


def _numeric_fields(data: list) -> set:
    """The fields with at least one numeric value; the others are text fields (not used)."""
    return {k for r in data for k, v in r.items() if k not in ("date", "day") and _as_number(v) is not None}


def _read_json(path: str, how: str = "error", report: Optional[List[str]] = None
               ) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
    """Records -> (dates, {normalised field: float array with NaN where absent or dropped}).

    Every value is checked here, before any feature work, so a bad file fails fast;
    what is dropped, clipped, read from text or not used goes into ``report``.
    """
    report = [] if report is None else report
    fname = os.path.basename(path)
    data = _load_records(path)
    dates = _record_dates(data, path)
    numeric = _numeric_fields(data)
    fields: Dict[str, np.ndarray] = {}
    text_fields, from_text = set(), {}
    for i, r in enumerate(data):
        for k, v in r.items():
            if k in ("date", "day"):
                continue
            if k not in numeric:
                text_fields.add(k)
                continue
            x = _checked(path, k, dates[i], v, how, report)
            if x is None:
                continue
            if isinstance(v, str):
                from_text.setdefault(k, []).append(dates[i])
            key = _norm(k)
            if key not in fields:
                fields[key] = np.full(len(data), np.nan)
            fields[key][i] = x
    for key, x in fields.items():
        _repair_spikes(path, key, dates, x, how, report)
    for k, days in from_text.items():
        note(report, f"{fname}: field '{k}' has {len(days)} value(s) written as text (first on {days[0]}); "
                     "read as numbers")
    if text_fields:
        note(report, f"{fname}: text field(s) {sorted(text_fields)} (no numeric value in any record) not used")
    return dates, fields


def _pick(fields, canonical, path, report) -> Optional[np.ndarray]:
    """The canonical counter, filled from known aliases where it is absent (reported)."""
    out = None
    for alias in ALIASES.get(canonical, (canonical,)):
        if alias not in fields:
            continue
        if out is None:
            out = fields[alias].copy()
            if alias != canonical:
                note(report, f"{os.path.basename(path)}: field '{canonical}' read from '{alias}'")
        else:
            fill = np.isnan(out) & ~np.isnan(fields[alias])
            if fill.any():
                out[fill] = fields[alias][fill]
                note(report, f"{os.path.basename(path)}: field '{canonical}' filled from alias '{alias}' on "
                             f"{int(fill.sum())} dates (renamed field)")
    return out


def _coverage(name, x, dates, fname, report) -> None:
    """Report late starts, early stops and gaps of one counter (its values were checked by ``_read_json``)."""
    ok = ~np.isnan(x)
    first, last = np.flatnonzero(ok)[[0, -1]]
    span_all = (dates[0], dates[-1])
    msgs = []
    if first > 0:
        msgs.append(f"starts late on {dates[first]} (NaN before: deltas 0 there, as in the original)")
    if last < len(x) - 1:
        msgs.append(f"stops after {dates[last]} (NaN after: deltas 0)")
    holes = int((~ok[first : last + 1]).sum())
    if holes:
        msgs.append(f"{holes} records without it inside its range (deltas 0 around them)")
    dec = int(np.sum(np.diff(x[ok]) < 0))
    if dec:
        msgs.append(f"decreases on {dec} days (negative corrections kept as negative deltas)")
    if msgs:
        note(report, f"{fname}: field '{name}' " + "; ".join(msgs) + f" [file covers {span_all[0]}..{span_all[1]}]")


def _complete(dates, x) -> Tuple[np.ndarray, np.ndarray]:
    """Reindex to every day from the first to the last record, without fill."""
    full = np.arange(dates[0], dates[-1] + 1)
    out = np.full(len(full), np.nan)
    out[(dates - dates[0]).astype(np.int64)] = x
    return full, out


def load_losses_world(directory: Optional[str] = None, monthly_csv_dir: Optional[str] = None, *,
                      implausible_values: str = "error") -> World:
    """The real-data ``World``; read ``World.report`` for what was found, filled, clipped or dropped.

    ``directory`` None reads the bundled snapshot; ``implausible_values`` is ``"error"``
    (the default: a bad value stops the load), ``"clip"`` or ``"drop"``.
    """
    how = check_implausible_values(implausible_values)
    directory = bundled_losses_dir() if directory is None else directory
    report: List[str] = []
    p_path = os.path.join(directory, PERSONNEL_FILE)
    e_path = os.path.join(directory, EQUIPMENT_FILE)
    p_dates, p_fields = _read_json(p_path, how, report)
    e_dates, e_fields = _read_json(e_path, how, report)

    for path, dates, fields in ((p_path, p_dates, p_fields), (e_path, e_dates, e_fields)):
        fname = os.path.basename(path)
        gaps = np.diff(dates).astype(np.int64) - 1
        if np.any(gaps > 0):
            i = np.flatnonzero(gaps > 0)
            spans = ", ".join(f"{dates[j] + 1}..{dates[j + 1] - 1}" for j in i[:5])
            note(report, f"{fname}: {int(gaps.sum())} missing days in {len(i)} gap(s) ({spans}"
                         f"{', ...' if len(i) > 5 else ''}); deltas are 0 there and on the day after, "
                         "as in the original")
        for (olds, new) in KNOWN_RENAMES.items():
            if all(o in fields for o in olds) and new in fields:
                last_old = max(dates[~np.isnan(fields[o])][-1] for o in olds)
                first_new = dates[~np.isnan(fields[new])][0]
                note(report, f"{fname}: fields {list(olds)} stop after {last_old} and '{new}' starts on {first_new} "
                             f"(renamed/merged; not used by the four sources)")

    # Personnel source.
    pers = _pick(p_fields, "personnel", p_path, report)
    if pers is None or np.all(np.isnan(pers)):
        raise DataError(f"{p_path}: no 'personnel' field; expected cumulative personnel counts")
    _coverage("personnel", pers, p_dates, PERSONNEL_FILE, report)
    pow_ = _pick(p_fields, "POW", p_path, report)
    if pow_ is not None and np.any(~np.isnan(pow_)):
        _coverage("POW", pow_, p_dates, PERSONNEL_FILE, report)
    else:
        note(report, f"{PERSONNEL_FILE}: no 'POW' field; pow features are 0")
        pow_ = None
    full_p, pers_c = _complete(p_dates, pers)
    pow_c = _complete(p_dates, pow_)[1] if pow_ is not None else None
    daily = {"personnel": SourceTable("personnel", full_p, fe.personnel_features(pers_c, pow_c),
                                      fe.PERSONNEL_FEATURES, p_path)}

    # Equipment sources.
    full_e = np.arange(e_dates[0], e_dates[-1] + 1)
    counters = {}
    for c in USED_EQUIPMENT:
        x = _pick(e_fields, c, e_path, report)
        if x is None or np.all(np.isnan(x)):
            note(report, f"{EQUIPMENT_FILE}: field '{c}' never occurs; its 3 features are 0 (layout kept)")
            x = np.zeros(len(e_dates))
        else:
            _coverage(c, x, e_dates, EQUIPMENT_FILE, report)
        counters[c] = _complete(e_dates, x)[1]
    for src in ("drones", "armor", "artillery"):
        cols, _ = fe.EQUIPMENT_SOURCES[src]
        daily[src] = SourceTable(src, full_e, fe.equipment_features([counters[c] for c in cols]),
                                 fe.equipment_feature_names(src), e_path)
    unused = sorted(k for k in e_fields if not any(k in ALIASES.get(c, (c,)) for c in USED_EQUIPMENT))
    spans = []
    for k in unused:
        seen = e_dates[~np.isnan(e_fields[k])]
        spans.append(f"{k} {seen[0]}..{seen[-1]}")
    note(report, f"{EQUIPMENT_FILE}: fields not used by the four sources (first..last date): {', '.join(spans)}")

    # Targets: phases from the operations timeline over the data's span.
    t_start = min(full_p[0], full_e[0], np.datetime64("2022-02-24"))
    t_end = max(full_p[-1], full_e[-1])
    dd, phase, trans, n_act = phase_timeline(str(t_start), str(t_end))

    monthly, month_t, radiance = _read_monthly_dir(monthly_csv_dir, report)
    if not monthly:
        monthly = _monthly_from_daily(daily, report)
    if radiance is None:
        anomaly, a_valid = np.zeros(len(dd), np.float32), np.zeros(len(dd), bool)
        note(report, "no VIIRS radiance CSV: anomaly targets are invalid for every day (the loss falls back)")
    else:
        r_dates, r_vals = radiance
        axis = np.full(len(dd), np.nan)
        idx = (r_dates - dd[0]).astype(np.int64)
        ok = (idx >= 0) & (idx < len(dd))
        axis[idx[ok]] = r_vals[ok]
        anomaly, a_valid = fe.viirs_anomaly(axis)
    if month_t is None:
        note(report, "no casualty CSV: casualty targets are invalid for every month (the loss falls back)")
        month_t = MonthTargets(np.zeros(0, "datetime64[D]"), np.zeros(0), np.zeros(0, bool))
    note(report, f"phase labels from the operations timeline (docs/data.md 9), valid {dd[0]}..{dd[-1]}; "
                 f"{int(trans[1:].sum())} transitions")
    day_t = DayTargets(dd, phase, np.ones(len(dd), bool), trans, anomaly.astype(np.float32), a_valid, n_act)
    return World(daily, monthly, day_t, month_t, name=f"losses:{directory}", report=report)


def _monthly_from_daily(daily: Dict[str, SourceTable], report) -> Dict[str, SourceTable]:
    """Monthly means of the raw daily deltas (han-jax fallback when no monthly CSV is given)."""
    out = {}
    p = daily["personnel"]
    months = np.unique(month_start(p.dates))
    pm_idx = np.searchsorted(months, month_start(p.dates))

    def mean_by_month(idx, x, n):
        cnt = np.bincount(idx, minlength=n).astype(float)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.bincount(idx, x, minlength=n) / np.where(cnt > 0, cnt, np.nan)

    n = len(months)
    pd_, pw = p.values[:, 0], p.values[:, 1]
    mean_p = mean_by_month(pm_idx, pd_, n)
    sq = mean_by_month(pm_idx, pd_ ** 2, n)
    mx = np.full(n, -np.inf)
    np.maximum.at(mx, pm_idx, pd_)
    out["personnel_monthly"] = SourceTable(
        "personnel_monthly", months,
        np.column_stack([mean_p, mean_by_month(pm_idx, pw, n), np.sqrt(np.maximum(sq - mean_p ** 2, 0)), mx]),
        ("personnel_daily_mean", "pow_daily_mean", "personnel_daily_std", "personnel_daily_max"),
        "monthly aggregate of personnel", counts=True,
    )
    cols, names = [], []
    e_months = None
    for src in ("drones", "armor", "artillery"):
        t = daily[src]
        e_months = np.unique(month_start(t.dates))
        idx = np.searchsorted(e_months, month_start(t.dates))
        for j, fname in enumerate(t.feature_names):
            if fname.endswith("_daily") and "_total_" not in fname:
                cols.append(mean_by_month(idx, t.values[:, j], len(e_months)))
                names.append(fname + "_mean")
    out["equipment_monthly"] = SourceTable("equipment_monthly", e_months, np.column_stack(cols), tuple(names),
                                           "monthly aggregate of drones/armor/artillery", counts=True)
    note(report, "no monthly source CSVs: monthly inputs are monthly means of the daily loss deltas "
                 f"(personnel_monthly 4, equipment_monthly {len(names)}), not the original's monthly sources")
    return out


def _read_csv(path: str, monthly: bool) -> Tuple[np.ndarray, Tuple[str, ...], np.ndarray]:
    """Dates, feature names and values of a monthly CSV.

    An error names the file and the position (line, column number), never the file's
    content: the folder may come from a run folder's ``config.json``, i.e. from someone else.
    """
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}); expected a CSV file") from None
    except csv.Error as e:
        raise DataError(f"{path}: not a CSV file ({e}); expected 'date' plus feature columns") from None
    if not rows:
        raise DataError(f"{path}: empty file; expected a header with a 'date' column")
    header = [h.strip() for h in rows[0]]
    if "date" not in header:
        raise DataError(f"{path}: no 'date' column in the header (line 1); expected 'date' plus feature columns")
    di = header.index("date")
    feats = [h for i, h in enumerate(header) if i != di]
    if not feats:
        raise DataError(f"{path}: only a 'date' column; expected at least one feature column")
    dates, vals = [], []
    for ln, r in enumerate(rows[1:], start=2):
        if not any(c.strip() for c in r):
            continue
        if len(r) != len(header):
            raise DataError(f"{path}: line {ln} has {len(r)} cells; expected {len(header)}")
        s = r[di].strip()
        try:
            d = np.datetime64(s[:7] if monthly else s[:10], "M" if monthly else "D").astype("datetime64[D]")
        except ValueError as e:
            raise DataError(f"{path}: line {ln}, column {di + 1} (date) is not a date; expected YYYY-MM or "
                            "YYYY-MM-DD") from e
        row = []
        for i, c in enumerate(r):
            if i == di:
                continue
            c = c.strip()
            try:
                x = float(c) if c not in ("", "NA", "NaN", "nan") else np.nan
            except ValueError as e:
                raise DataError(f"{path}: line {ln}, column {i + 1} is not a number; expected a number or empty") from e
            if np.isinf(x):
                raise DataError(f"{path}: line {ln}, column {i + 1} is infinite; expected a finite number or empty")
            row.append(x)
        dates.append(d)
        vals.append(row)
    if not dates:
        raise DataError(f"{path}: no data rows; expected at least one")
    dates = np.array(dates, "datetime64[D]")
    check_dates(dates, path)
    v = np.array(vals, np.float64)
    all_nan = np.all(np.isnan(v), axis=0)
    if np.any(all_nan):
        raise DataError(f"{path}: column(s) {[feats[i] for i in np.flatnonzero(all_nan)]} are entirely empty; "
                        "expected some values")
    return dates, tuple(feats), v


def _fatality_targets(dates, fatalities: np.ndarray, origin: str) -> MonthTargets:
    """Monthly casualty targets from a fatalities column (valid where present, counts >= 0)."""
    if np.any(fatalities[~np.isnan(fatalities)] < 0):
        raise DataError(f"{origin}: column 'fatalities' has negative values; expected counts >= 0")
    return MonthTargets(dates, np.nan_to_num(fatalities), ~np.isnan(fatalities))


def _target_column(path: str, column: str, *, monthly: bool):
    """(dates, values) of one target CSV's ``column``; a missing column is an error naming the file."""
    d, feats, v = _read_csv(path, monthly=monthly)
    if column not in feats:
        raise DataError(f"{path}: no '{column}' column in {list(feats)}; expected date,{column}")
    return d, v[:, feats.index(column)]


def _read_monthly_dir(directory: Optional[str], report):
    monthly: Dict[str, SourceTable] = {}
    if directory is None:
        return monthly, None, None
    if not os.path.isdir(directory):
        raise MissingFileError(f"{directory}: monthly CSV directory not found")
    files = sorted(f for f in os.listdir(directory) if f.endswith(".csv"))
    known = [s for s, _ in MONTHLY_SOURCES]
    names = [f[:-4] for f in files if f not in (TARGET_FATALITIES, TARGET_VIIRS)]
    names.sort(key=lambda s: (known.index(s) if s in known else len(known), s))
    for name in names:
        path = os.path.join(directory, name + ".csv")
        d, feats, v = _read_csv(path, monthly=True)
        monthly[name] = SourceTable(name, d, v, feats, path)
        note(report, f"monthly source '{name}' from {path}: {len(feats)} features, {d[0]}..{d[-1]}")
    month_t = None
    fpath = os.path.join(directory, TARGET_FATALITIES)
    if os.path.exists(fpath):
        d, fatalities = _target_column(fpath, "fatalities", monthly=True)
        month_t = _fatality_targets(d, fatalities, fpath)
        note(report, f"casualty targets from {fpath}: {int((~np.isnan(fatalities)).sum())} valid months")
    elif "hdx_conflict" in monthly and "fatalities" in monthly["hdx_conflict"].feature_names:
        t = monthly["hdx_conflict"]
        month_t = _fatality_targets(t.dates, t.values[:, t.feature_names.index("fatalities")], t.origin)
        note(report, f"casualty targets from the 'fatalities' column of {t.origin} "
                     "(the original's input/target leakage)")
    radiance = None
    vpath = os.path.join(directory, TARGET_VIIRS)
    if os.path.exists(vpath):
        radiance = _target_column(vpath, "radiance_mean", monthly=False)
        note(report, f"VIIRS anomaly targets from {vpath}: {len(radiance[0])} days")
    return monthly, month_t, radiance
