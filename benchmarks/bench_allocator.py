"""The C heap under a train step: page faults, system time, step time, peak memory and the warm start.

Usage::

    python benchmarks/bench_allocator.py [--preset default] [--steps 8] [--rounds 2] [--settings a,b]
                                         [--repo NAME=PATH ...] [--out FILE.json]

One process fills a new compilation-cache folder (a cold start). Then, for ``--rounds`` rounds, one
fresh process per heap setting, alternating, loads the stored steps from that folder as a warm start
does (``bench_startup.started``: import, data, state, first train step) and runs ``--steps`` more
train steps on the same batch. Per process: the time to the first step (from launch, interpreter
included), the first step after loading, each later step's wall time, minor page faults and system
time (``getrusage``), and the peak resident memory. Settings:

* ``system``: ``HAN_JAX_MALLOC=system``, glibc as it is;
* ``glibc``: glibc's settings applied at import (``han_jax.core.allocator``; what ``auto``, the
  default, gives where tcmalloc is not installed);
* ``tunables``: the same settings as glibc tunables in the environment, the reference for ``glibc``;
* ``jemalloc`` / ``tcmalloc``: ``LD_PRELOAD`` of the library, as the ``han-jax`` command re-executes
  itself with it (``auto``: tcmalloc), where it is installed.

``--repo NAME=PATH`` (repeatable) measures other checkouts of han-jax the same way, each with its
own compilation-cache folder, every (checkout, setting) pair alternating with the others: a
before/after table of a code change on one machine in one session. Without it, this checkout.

Output: a markdown table (medians over rounds) on stdout and, with ``--out``, JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from han_jax.core import allocator  # noqa: E402  (this import does not import JAX)

TUNABLES = "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"


def settings() -> dict:
    """Each heap setting's environment; the preloaded allocators only where the library is installed."""
    out = {"system": {allocator.ENV: allocator.SYSTEM}, "glibc": {allocator.ENV: allocator.GLIBC},
           "tunables": {"GLIBC_TUNABLES": TUNABLES}}
    for name in (allocator.JEMALLOC, allocator.TCMALLOC):
        env = allocator.preload_environment({allocator.ENV: name, "PATH": os.environ.get("PATH", "")})
        if env is not None:
            out[name] = {k: env[k] for k in ("LD_PRELOAD", "MALLOC_CONF") if k in env}
    return out


def worker(preset: str, cache_dir: str, launched: float, steps: int) -> dict:
    """In a fresh process: a warm start, then ``steps`` train steps measured one by one."""
    import jax

    from benchmarks.bench_startup import started

    marks, compiled, state, batch = started(preset, cache_dir, launched)
    rows = []
    for _ in range(steps):
        before, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        state, out = compiled.train(state, *batch)
        jax.block_until_ready(out)
        after = resource.getrusage(resource.RUSAGE_SELF)
        rows.append({"step_s": time.perf_counter() - t, "minor_faults": after.ru_minflt - before.ru_minflt,
                     "system_s": after.ru_stime - before.ru_stime})
    return {**marks, "allocator": allocator.configure(), "steps": rows,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run(preset: str, cache_dir: str, steps: int, env_extra: dict, repo: str = REPO) -> dict:
    """One fresh process of ``repo``'s :func:`worker` with the heap settings ``env_extra``."""
    launched = time.time()
    code = (f"import json, sys; sys.path.insert(0, {repo!r}); from benchmarks.bench_allocator import worker; "
            f"print('ALLOC ' + json.dumps(worker({preset!r}, {cache_dir!r}, {launched!r}, {steps!r})))")
    heap_env = (allocator.ENV, "GLIBC_TUNABLES", "LD_PRELOAD", "MALLOC_CONF")
    env = {k: v for k, v in os.environ.items() if k not in heap_env}
    env.update(JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"), **env_extra)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=repo)
    for line in proc.stdout.splitlines():
        if line.startswith("ALLOC "):
            return json.loads(line[len("ALLOC "):])
    return {"error": (proc.stderr or proc.stdout)[-2000:]}


def summary(results: list) -> dict:
    """Medians over a setting's processes (each step of each process one sample), and the minimum step."""
    ok = [r for r in results if "error" not in r]
    if not ok:
        return {"error": results[-1]["error"][-300:]}
    steps = [s for r in ok for s in r["steps"]]
    return {"processes": len(ok), "allocator": ok[0]["allocator"],
            "step_median_s": statistics.median(s["step_s"] for s in steps),
            "step_min_s": min(s["step_s"] for s in steps),
            "minor_faults_per_step": statistics.median(s["minor_faults"] for s in steps),
            "system_s_per_step": statistics.median(s["system_s"] for s in steps),
            "first_step_s": statistics.median(r["first_step_s"] for r in ok),
            "warm_start_s": statistics.median(r["time_to_first_step_s"] for r in ok),
            "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in ok)}


def markdown(table: dict) -> str:
    lines = ["| heap | as the process reported it | step median (min) s | minor faults / step | system s / step | "
             "first step after loading s | warm start s | peak RSS MiB |", "|---|---|---|---|---|---|---|---|"]
    for name, r in table.items():
        if "error" in r:
            lines.append(f"| {name} | error: {r['error'][-120:]!r} | | | | | | |")
            continue
        lines.append(f"| {name} | {r['allocator']} | {r['step_median_s']:.2f} ({r['step_min_s']:.2f}) | "
                     f"{r['minor_faults_per_step']:,.0f} | {r['system_s_per_step']:.2f} | {r['first_step_s']:.2f} | "
                     f"{r['warm_start_s']:.1f} | {r['peak_rss_mb']:,.0f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="default", help="tiny, small or default (the original's model)")
    ap.add_argument("--steps", type=int, default=8, help="train steps measured per process after the first")
    ap.add_argument("--rounds", type=int, default=2, help="processes per setting, alternating")
    ap.add_argument("--settings", help="comma-separated subset of: " + ", ".join(settings()))
    ap.add_argument("--repo", action="append", default=[], metavar="NAME=PATH",
                    help="a checkout to measure (repeatable); default: this one")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)
    chosen = settings()
    if args.settings:
        chosen = {name: chosen[name] for name in args.settings.split(",")}
    repos = {}
    for item in args.repo:
        name, sep, path = item.partition("=")
        if not sep or not os.path.isfile(os.path.join(path, "benchmarks", "bench_allocator.py")):
            ap.error(f"--repo {item!r}: expected NAME=PATH of a han-jax checkout with benchmarks/bench_allocator.py")
        if name in repos:
            ap.error(f"--repo {item!r}: the name {name!r} is given twice")
        repos[name] = os.path.abspath(path)
    rows = ({(f"{repo} {name}" if repos else name): (path, env) for repo, path in (repos or {"": REPO}).items()
             for name, env in chosen.items()})
    results = {row: [] for row in rows}
    with tempfile.TemporaryDirectory(prefix="han-jax-xla-") as cache_root:
        cold = {}
        for path in dict.fromkeys(path for path, _ in rows.values()):
            cache_dir = os.path.join(cache_root, str(len(cold)))
            cold[path] = (cache_dir, run(args.preset, cache_dir, 0, {}, path))
            shown = cold[path][1].get("time_to_first_step_s", cold[path][1].get("error"))
            print(f"cold start {path}: {shown}", file=sys.stderr, flush=True)
        for i in range(args.rounds):
            for name, (path, env) in rows.items():
                r = run(args.preset, cold[path][0], args.steps, env, path)
                results[name].append(r)
                shown = r.get("error", "")[-300:] or (f"{statistics.median(s['step_s'] for s in r['steps']):.2f} s, "
                                                      f"{r['peak_rss_mb']:.0f} MiB")
                print(f"round {i} {name}: {shown}", file=sys.stderr, flush=True)
    table = {name: summary(rs) for name, rs in results.items()}
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, glibc {platform.libc_ver()[1]}"
    print(f"Machine: {machine}; preset {args.preset}, B from the preset, {args.steps} steps x {args.rounds} "
          f"processes per setting\n\n{markdown(table)}")
    out = {"machine": machine, "preset": args.preset, "repos": repos,
           "cold_start": {path: r for path, (_, r) in cold.items()}, "summary": table, "processes": results}
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
