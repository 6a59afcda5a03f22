"""The default train step's compiled module: its size, its cold compile, its run time.

Usage::

    python benchmarks/bench_compile.py [--preset default|small|tiny] [--runs 5] [--repeat 1] [--out FILE.json]
                                       [--repo PATH] [--vmap-sources]

Each measurement is a fresh process (nothing cached, JAX's persistent cache off): it builds
the preset's step specification on a random batch of the data's shapes (B, T, M of the
preset), then lowers the train step (trace and lower, timed), compiles it (timed), counts
the compiled module's instructions, computations, fusions and distinct fused computations
(``han_jax.testing.hlo_counts`` of this checkout, whichever checkout is measured), and times
the first and then ``--runs`` more steps.
``--repeat N`` runs N fresh processes and reports each. ``--repo PATH`` measures another
checkout of han-jax the same way (its ``han_jax`` imported from there): the same numbers
for two versions on one machine in one session, e.g. before and after a change. Prints a
markdown table and, with ``--out``, JSON. ``--vmap-sources`` measures the alternative
``model.vmap_sources=True`` (one vmapped encoder over the daily sources).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _build(preset: str, vmap_sources: bool = False):
    """``(train_fn, args)`` of the checkout on ``sys.path``: this one's API, or the one before ``han_jax.training``."""
    import dataclasses

    import jax

    from han_jax import config as configs
    from han_jax.testing import random_batch

    config = configs.get_config(preset)
    if vmap_sources:
        config = config.replace(model=dataclasses.replace(config.model, vmap_sources=True))
    b, t, m = config.train.batch_size, config.data.daily_seq_len, config.data.monthly_seq_len
    layout = dict(daily_sources=(configs.SMALL_DAILY_SOURCES if preset == "tiny" else configs.DAILY_SOURCES),
                  monthly_sources=(configs.SMALL_MONTHLY_SOURCES if preset == "tiny" else configs.MONTHLY_SOURCES))
    try:
        from han_jax.config import Resolved
        from han_jax.training.devices import SingleDevice
        from han_jax.training.schedule import Schedule
        from han_jax.training.spec import StepSpec
        from han_jax.training.steps import create_train_state
    except ImportError:  # a checkout from before the step specification: the whole Config was the static argument
        from han_jax.steps import create_train_state, jit_steps

        config = config.replace(model=dataclasses.replace(config.model, **layout))
        inputs, targets = random_batch(config.model, b=b, t=t, m=m, seed=0)
        state = create_train_state(jax.random.PRNGKey(0), config, inputs)
        return jit_steps(config).train, (state, inputs, targets)
    spec = StepSpec.of(config, Resolved(**layout))
    inputs, targets = random_batch(spec.model, b=b, t=t, m=m, seed=0)
    schedule = Schedule.of(config.step.optim, epochs=config.train.epochs)
    state = create_train_state(jax.random.PRNGKey(0), spec, inputs, schedule)
    steps = SingleDevice().steps(spec, schedule)
    return steps.compiled.train, (state, inputs, targets, steps.schedule)


def measure(preset: str, runs: int, vmap_sources: bool = False, hlo_path: str = "") -> dict:
    """In this process: lower, compile and run the preset's train step; its compiled text to ``hlo_path``."""
    import jax

    train, args = _build(preset, vmap_sources)
    t0 = time.perf_counter()
    lowered = train.lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    result = {"trace_lower_s": t1 - t0, "compile_s": t2 - t1}
    if hlo_path:
        with open(hlo_path, "w") as f:
            f.write(compiled.as_text())
    state, rest = args[0], args[1:]
    times = []
    for _ in range(runs + 1):
        t = time.perf_counter()
        state, out = compiled(state, *rest)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t)
    result.update(first_step_s=times[0], step_median_s=statistics.median(times[1:]), step_min_s=min(times[1:]))
    return result


def run_fresh(preset: str, runs: int, repo: str, vmap_sources: bool = False) -> dict:
    # han_jax from ``repo``, this file's code to measure it; the module counted here, by this checkout's
    # hlo_counts (main() puts it first on sys.path; imported here because the child loads this file with
    # another checkout's han_jax), so that every checkout is counted the same way.
    from han_jax.testing import hlo_counts

    hlo = tempfile.NamedTemporaryFile(suffix=".hlo.txt", delete=False)
    hlo.close()
    code = (f"import importlib.util, json, sys; sys.path.insert(0, {repo!r}); "
            f"spec = importlib.util.spec_from_file_location('bench_compile', {os.path.abspath(__file__)!r}); "
            "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module); "
            f"print('RESULT ' + json.dumps(module.measure({preset!r}, {runs}, {vmap_sources!r}, {hlo.name!r})))")
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR",)}
    env.update(JAX_PLATFORMS=env.get("JAX_PLATFORMS", "cpu"), HAN_JAX_COMPILATION_CACHE="off")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=repo)
    try:
        for line in proc.stdout.splitlines():
            if line.startswith("RESULT "):
                with open(hlo.name) as f:
                    return {**json.loads(line[len("RESULT "):]), **hlo_counts(f.read())}
        return {"error": (proc.stderr or proc.stdout)[-2000:]}
    finally:
        os.unlink(hlo.name)


def _commit(repo: str) -> str:
    proc = subprocess.run(["git", "-C", repo, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return (proc.stdout.strip() or "?") + ("+changes" if dirty else "")


def main(argv=None) -> list:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="default", choices=("default", "small", "tiny"))
    ap.add_argument("--runs", type=int, default=5, help="timed steps after the first (default 5)")
    ap.add_argument("--repeat", type=int, default=1, help="fresh processes to measure (default 1)")
    ap.add_argument("--repo", default=REPO, help="the han-jax checkout to measure (default this one)")
    ap.add_argument("--vmap-sources", action="store_true", help="measure model.vmap_sources=True")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)
    repo = os.path.abspath(args.repo)
    sys.path.insert(0, REPO)
    rows = []
    for i in range(args.repeat):
        r = run_fresh(args.preset, args.runs, repo, args.vmap_sources)
        r.update(preset=args.preset, commit=_commit(repo) + (" vmap_sources" if args.vmap_sources else ""),
                 process=i)
        rows.append(r)
        print(f"{r['commit']} #{i}: {r.get('compile_s', r.get('error'))}", file=sys.stderr, flush=True)
    import platform

    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; preset {args.preset}\n")
    print("| commit | instructions | fusions | kernels | trace+lower (s) | compile (s) | first step (s) | "
          "step median (s) |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['commit']} | error: {r['error'][-200:]!r} | | | | | | |")
            continue
        print(f"| {r['commit']} | {r['instructions']:,} | {r['fusions']:,} | {r['kernels']:,} | "
              f"{r['trace_lower_s']:.1f} | {r['compile_s']:.1f} | {r['first_step_s']:.2f} | {r['step_median_s']:.3f} |")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"cpu_count": os.cpu_count(), "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
