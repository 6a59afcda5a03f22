"""Random batches in the han-jax batch format, and a count of compiled kernels, for tests and benchmarks.

Shapes follow ``docs/data.md`` section 3; values are random but structured the
way real batches are (whole-day observation masks across a source's features,
padding rows at the end, alternating high/low monthly observation rates).
"""

from __future__ import annotations

import collections
import re
from typing import Optional

import numpy as np

from han_jax.config import ModelConfig
from han_jax.core.batch import Inputs, Targets


def month_boundaries(b: int, t: int, m: int) -> np.ndarray:
    """Contiguous months of ~30 days ending at the window end (the first may be partial): int32 [b, m, 2]."""
    ends = t - 30 * np.arange(m)[::-1]
    starts = np.maximum(ends - 30, 0)
    bnd = np.stack([starts, ends], -1).astype(np.int32)
    return np.broadcast_to(bnd, (b, m, 2)).copy()


def random_batch(config: ModelConfig, b: int = 4, t: int = 60, m: int = 3, seed: int = 0,
                 n_real: Optional[int] = None, p_obs: float = 0.9) -> tuple[Inputs, Targets]:
    """A batch for ``config``'s source layout: ``b`` rows (the first ``n_real`` real), ``t`` days, ``m`` months."""
    rng = np.random.default_rng(seed)
    n_real = b if n_real is None else n_real
    df, dm, mf, mm = {}, {}, {}, {}
    for name, f in config.daily_sources:
        obs = rng.random((b, t, 1)) < p_obs
        dm[name] = np.broadcast_to(obs, (b, t, f)).copy()
        df[name] = np.where(dm[name], rng.normal(size=(b, t, f)), 0.0).astype(np.float32)
    for name, f in config.monthly_sources:
        obs = rng.random((b, m, 1)) < p_obs
        mm[name] = np.broadcast_to(obs, (b, m, f)).copy()
        mf[name] = np.where(mm[name], rng.normal(size=(b, m, f)), 0.0).astype(np.float32)
    ft = config.n_monthly_features + config.n_daily_features
    inputs = Inputs(daily_features=df, daily_masks=dm, monthly_features=mf, monthly_masks=mm,
                    month_boundaries=month_boundaries(b, t, m))
    targets = Targets(
        phase_index=rng.integers(0, 11, b).astype(np.int32),
        phase_valid=rng.random(b) < 0.9,
        is_transition=rng.random(b) < 0.3,
        fatalities=rng.gamma(2.0, 2000.0, b).astype(np.float32),
        casualty_valid=rng.random(b) < 0.9,
        anomaly=rng.normal(size=b).astype(np.float32),
        anomaly_valid=rng.random(b) < 0.8,
        forecast_targets=rng.normal(size=(b, m, ft)).astype(np.float32),
        forecast_masks=rng.random((b, m, ft)) < 0.8,
        sample_mask=np.arange(b) < n_real,
        daily_obs_rate=rng.random(b).astype(np.float32),
        monthly_obs_rate=np.where(np.arange(b) % 2 == 0, 0.9, 0.3).astype(np.float32),
    )
    return inputs, targets


def compiled_kernels(hlo_text: str, op_name: str = "") -> tuple[int, int]:
    """(fusions, distinct fused computations) in a compiled module's text (``compiled.as_text()``).

    XLA:CPU compiles one kernel per distinct fused computation and reuses it for every
    fusion that calls an identical one, so the second number is what the backend
    compiles; here two computations are identical when their text is, once instruction
    names and metadata are dropped (so is the name of a called reducer: two bodies that
    differ only in it count as one). ``op_name``: count only fusions whose
    ``op_name`` metadata contains it.
    """
    bodies: dict = {}
    name = None
    for line in hlo_text.splitlines():
        header = re.match(r"^%?([\w.\-]+) .*\{\s*$", line)
        if header and not line.startswith(" "):
            name = header.group(1)
            bodies[name] = []
        elif line.startswith("}"):
            name = None
        elif name is not None:
            line = re.sub(r", metadata=\{[^}]*\}", "", line)
            bodies[name].append(re.sub(r"%[\w.\-]+", "%", line.strip()))
    callees = collections.Counter()
    for line in hlo_text.splitlines():
        fusion = re.search(r"= .*? fusion\(.*calls=%?([\w.\-]+)", line)  # any result type, tuples too
        if fusion and op_name in (re.search(r'op_name="([^"]*)"', line) or [None, ""])[1]:
            callees["\n".join(bodies[fusion.group(1)])] += 1
    return sum(callees.values()), len(callees)


def hlo_counts(hlo_text: str) -> dict:
    """Size of a compiled module (``compiled.as_text()``): instructions, computations, fusions, distinct kernels.

    An instruction is a line defining a value inside a computation (``%name = ...``); XLA's
    passes, its thunk emission and a stored executable's load all scale with their number.
    """
    instructions = computations = 0
    for line in hlo_text.splitlines():
        if re.match(r"^\s+(ROOT )?%?[\w.\-]+ = ", line):
            instructions += 1
        elif re.match(r"^%?[\w.\-]+ .*\{\s*$", line) and not line.startswith(" "):
            computations += 1
    fusions, kernels = compiled_kernels(hlo_text)
    return {"instructions": instructions, "computations": computations, "fusions": fusions, "kernels": kernels}
