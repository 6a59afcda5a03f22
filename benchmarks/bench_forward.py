"""Times the default-config MultiResolutionHAN forward pass (jit, deterministic) on this host.

Usage: python benchmarks/bench_forward.py [--batch 8 --days 365 --months 12 --runs 10 --policy f32 --out r.json]
Reports the median wall time over ``--runs`` calls after one warm-up (compile) call,
each ended with ``block_until_ready``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from han_jax.batch import Inputs
from han_jax.config import ModelConfig
from han_jax.model import MultiResolutionHAN
from han_jax.precision import Policy


def make_inputs(cfg: ModelConfig, b: int, t: int, m: int, seed: int = 0) -> Inputs:
    rs = np.random.RandomState(seed)
    df, dm, mf, mm = {}, {}, {}, {}
    for name, f in cfg.daily_sources:
        obs = np.broadcast_to(rs.rand(b, t, 1) < 0.8, (b, t, f))
        dm[name] = jnp.asarray(obs)
        df[name] = jnp.asarray(np.where(obs, rs.randn(b, t, f), 0).astype(np.float32))
    for name, f in cfg.monthly_sources:
        obs = rs.rand(b, m, f) < 0.8
        mm[name] = jnp.asarray(obs)
        mf[name] = jnp.asarray(np.where(obs, rs.randn(b, m, f), 0).astype(np.float32))
    ends = t - 30 * np.arange(m)[::-1]
    bnd = np.stack([np.maximum(ends - 30, 0), ends], -1)
    return Inputs(df, dm, mf, mm, jnp.asarray(np.broadcast_to(bnd, (b, m, 2)).astype(np.int32)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--days", type=int, default=365)
    ap.add_argument("--months", type=int, default=12)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--policy", default="f32")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()

    cfg = ModelConfig()
    policy = Policy.from_string(args.policy)
    model = MultiResolutionHAN(cfg, policy)
    inputs = make_inputs(cfg, args.batch, args.days, args.months)
    t0 = time.perf_counter()
    variables = jax.jit(lambda k, x: model.init({"params": k}, x, deterministic=True))(jax.random.PRNGKey(0), inputs)
    jax.block_until_ready(variables)
    init_s = time.perf_counter() - t0
    fwd = jax.jit(lambda v, x: model.apply(v, x, deterministic=True))
    t0 = time.perf_counter()
    jax.block_until_ready(fwd(variables, inputs))
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        jax.block_until_ready(fwd(variables, inputs))
        times.append(time.perf_counter() - t0)
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(variables))
    result = {
        "batch": args.batch, "days": args.days, "months": args.months, "policy": policy.name,
        "runs": args.runs, "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
        "first_call_s": compile_s, "init_s": init_s, "n_params": int(n_params),
        "backend": jax.default_backend(), "device": str(jax.devices()[0]), "cpu_count": __import__("os").cpu_count(),
        "jax": jax.__version__, "python": platform.python_version(),
    }
    print("| B | T | M | policy | median (s) | min (s) | first call incl. compile (s) | params | backend |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {args.batch} | {args.days} | {args.months} | {policy.name} | {result['median_s']:.4f} | "
        f"{result['min_s']:.4f} | {compile_s:.1f} | {n_params:,} | {result['backend']} |"
    )
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
