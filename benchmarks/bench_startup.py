"""Time to the first train step, cold and warm: what a user waits for before training starts.

Usage::

    python benchmarks/bench_startup.py [--presets small,default] [--out FILE.json]

For each preset, two fresh processes run what ``han-jax train`` runs before its
first step: import, data (``prepare``), ``create_train_state`` and the first
``train_step`` (its compile, or its load from JAX's persistent compilation cache,
plus one run), with the command line's cache switched on in a new, empty folder.
The first process finds the folder empty (cold start), the second finds what
the first wrote (warm start: han-jax's stored executables, loaded without
tracing). With ``--jax-cache-only`` the same two starts run again in another
folder with only JAX's own cache, as before han-jax stored its executables: a
warm start then traces and lowers every step and loads the executable JAX keyed
by the lowered program. Wall time is counted from the moment the process
is launched, so interpreter and JAX start-up are in it. Output: a markdown table
on stdout and, with ``--out``, JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def first_step(preset: str, cache_dir: str, launched: float, executables: bool = True) -> dict:
    """In a fresh process: the CLI's start-up path to the end of the first train step, phase by phase.

    ``executables=False`` keeps JAX's persistent cache but not han-jax's stored executables
    (``han_jax.training.compilation_cache.persistent``): what a warm start cost before them.
    """
    return started(preset, cache_dir, launched, executables)[0]


def started(preset: str, cache_dir: str, launched: float, executables: bool = True):
    """:func:`first_step`'s phases, and what it built: ``(marks, steps, state, device_batch)``."""
    from han_jax.training import compilation_cache

    compilation_cache.enable_compilation_cache(cache_dir)
    if not executables:
        compilation_cache.set_executable_dir(None)
    import jax

    from han_jax.app.runs import prepare
    from han_jax.config import get_config
    from han_jax.data import iterate_batches
    from han_jax.training.devices import make_devices
    from han_jax.training.schedule import Schedule
    from han_jax.training.spec import StepSpec
    from han_jax.training.steps import create_train_state

    marks = {"import_s": time.time() - launched}
    t = time.perf_counter()
    config = get_config(preset)
    datasets, resolved = prepare(config)
    marks["data_s"] = time.perf_counter() - t
    t = time.perf_counter()
    devices = make_devices(config.train.num_devices, config.train.parallel)
    inputs, targets = next(iterate_batches(datasets.train, config.train.batch_size))
    spec = StepSpec.of(config, resolved)
    steps = devices.steps(spec, Schedule.of(config.step.optim, epochs=config.train.epochs,
                                            steps_per_epoch=resolved.steps_per_epoch))
    steps.prefetch("train", "start_epoch", "eval")  # as han_jax.app.train does
    state = devices.put_state(create_train_state(jax.random.PRNGKey(config.train.seed), spec, inputs))
    jax.block_until_ready(state)
    marks["init_s"] = time.perf_counter() - t
    t = time.perf_counter()
    state = steps.start_epoch(state, 0)
    batch = devices.put_batch((inputs, targets))
    state, out = steps.train(state, *batch)
    jax.block_until_ready(out)
    marks["first_step_s"] = time.perf_counter() - t
    marks["time_to_first_step_s"] = time.time() - launched
    marks["loss"] = float(out.metrics["weighted_total"])
    return marks, steps, state, batch


def measure(preset: str, cache_dir: str, executables: bool = True) -> dict:
    launched = time.time()
    code = (f"import json, sys; sys.path.insert(0, {REPO!r}); from benchmarks.bench_startup import first_step; "
            f"print('STARTUP ' + json.dumps(first_step({preset!r}, {cache_dir!r}, {launched!r}, {executables!r})))")
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)
    for line in proc.stdout.splitlines():
        if line.startswith("STARTUP "):
            return json.loads(line[len("STARTUP "):])
    return {"error": (proc.stderr or proc.stdout)[-2000:]}


def _folder_mb(path: str) -> float:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files) / 2**20


def markdown(rows: list) -> str:
    lines = ["| preset | start | time to first step (s) | import (s) | data (s) | init (s) | first step (s) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['preset']} | {r['start']} | error: {r['error'][-100:]!r} | | | | |")
            continue
        lines.append(f"| {r['preset']} | {r['start']} | {r['time_to_first_step_s']:.1f} | {r['import_s']:.1f} | "
                     f"{r['data_s']:.1f} | {r['init_s']:.1f} | {r['first_step_s']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> list:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="small,default", help="comma-separated presets (tiny, small, default)")
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--jax-cache-only", action="store_true",
                    help="also a cold and a warm start with JAX's persistent cache alone (the stored executables "
                         "off), in their own folder: the warm start before han-jax stored its executables")
    args = ap.parse_args(argv)
    rows = []
    kinds = [("", True)] + ([(", JAX's cache only", False)] if args.jax_cache_only else [])
    for preset in [p.strip() for p in args.presets.split(",") if p.strip()]:
        for label, executables in kinds:
            with tempfile.TemporaryDirectory(prefix="han-jax-xla-") as cache_dir:
                for start in ("cold", "warm"):
                    r = measure(preset, cache_dir, executables)
                    r.update(preset=preset, start=start + label, cache_mb=round(_folder_mb(cache_dir), 1),
                             executables_mb=round(_folder_mb(os.path.join(cache_dir, "executables")), 1))
                    rows.append(r)
                    print(f"{preset} {start + label}: {r.get('time_to_first_step_s', r.get('error'))}",
                          file=sys.stderr, flush=True)
    import platform

    table = markdown(rows)
    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores\n\n{table}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"cpu_count": os.cpu_count(), "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
