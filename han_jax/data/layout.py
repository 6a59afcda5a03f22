"""The data layout a model was built for: its sources and their feature names, in order.

A run records it (``layout.json``) so that new data can be checked against it
before anything is predicted: a model reads its inputs by position, so data with
another source, another feature or another order would be read as something else.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Tuple

from han_jax.data.alignment import SourceSelection
from han_jax.data.world import DataError

SourceFeatures = Tuple[Tuple[str, Tuple[str, ...]], ...]

LAYOUT_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class DataLayout:
    """Daily and monthly sources, each with its feature names, in the order the model reads them.

    Attributes:
      daily: ``((source, (feature, ...)), ...)`` for the daily sources.
      monthly: the same for the monthly sources.
    """

    daily: SourceFeatures
    monthly: SourceFeatures

    def model_layout(self) -> dict:
        """``ModelConfig`` keyword arguments (``daily_sources``, ``monthly_sources``) for this layout."""
        return {"daily_sources": tuple((n, len(f)) for n, f in self.daily),
                "monthly_sources": tuple((n, len(f)) for n, f in self.monthly)}

    def features(self, kind: str) -> Dict[str, Tuple[str, ...]]:
        """``{source: feature names}`` of the ``"daily"`` or ``"monthly"`` sources."""
        return dict(getattr(self, kind))

    def to_dict(self) -> dict:
        """Plain JSON data (``layout.json``)."""
        return {"format": LAYOUT_FORMAT,
                "daily": [{"source": n, "features": list(f)} for n, f in self.daily],
                "monthly": [{"source": n, "features": list(f)} for n, f in self.monthly]}

    @classmethod
    def from_dict(cls, data: dict, *, where: str = "layout") -> "DataLayout":
        """Rebuilds a layout from :meth:`to_dict`'s output; a malformed one is a one-line ``DataError``."""
        if not isinstance(data, dict) or data.get("format") != LAYOUT_FORMAT:
            raise DataError(f"{where}: expected a layout object with \"format\": {LAYOUT_FORMAT}")

        def sources(kind):
            entries = data.get(kind)
            if not isinstance(entries, list) or not all(
                    isinstance(e, dict) and isinstance(e.get("source"), str) and isinstance(e.get("features"), list)
                    and all(isinstance(f, str) for f in e["features"]) for e in entries):
                raise DataError(f"{where}: '{kind}' must be a list of {{\"source\": name, \"features\": [names]}}")
            return tuple((e["source"], tuple(e["features"])) for e in entries)

        return cls(daily=sources("daily"), monthly=sources("monthly"))


def layout_of(sources: SourceSelection) -> DataLayout:
    """The layout of a source selection (``select_sources``' output)."""
    return DataLayout(
        daily=tuple((n, tuple(sources.daily[n].feature_names)) for n in sources.daily_names),
        monthly=tuple((n, tuple(sources.monthly[n].feature_names)) for n in sources.monthly_names),
    )


def check_layout(expected: DataLayout, got: DataLayout, *, where: str) -> None:
    """Raises a one-line ``DataError`` naming the first difference between two layouts.

    Args:
      expected: the layout the model was built for (the run's ``layout.json``).
      got: the layout of the data at hand.
      where: what the data is, for the message (e.g. the data's origin).
    """
    for kind in ("daily", "monthly"):
        want, have = getattr(expected, kind), getattr(got, kind)
        want_names, have_names = [n for n, _ in want], [n for n, _ in have]
        if want_names != have_names:
            missing = [n for n in want_names if n not in have_names]
            extra = [n for n in have_names if n not in want_names]
            detail = "; ".join(part for part in (
                f"missing {missing}" if missing else "", f"not in the run {extra}" if extra else "",
                "" if missing or extra else "same sources in another order") if part)
            raise DataError(f"{where}: {kind} sources {have_names} differ from the run's {want_names} ({detail})")
        for (name, want_f), (_, have_f) in zip(want, have):
            if want_f != have_f:
                if len(want_f) != len(have_f):
                    raise DataError(f"{where}: {kind} source '{name}' has {len(have_f)} features, the run's has "
                                    f"{len(want_f)} ({list(want_f)})")
                i = next(i for i, (a, b) in enumerate(zip(want_f, have_f)) if a != b)
                raise DataError(f"{where}: {kind} source '{name}' feature {i} is '{have_f[i]}', the run's is "
                                f"'{want_f[i]}'")
