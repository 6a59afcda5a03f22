"""Where a jitted step's time goes: a jax.profiler trace, attributed to model modules.

Usage::

    python benchmarks/profile_step.py [--step train|eval] [--batch 8] [--days 365]
        [--depth 2] [--top 25] [--filter REGEX] [--trace-dir DIR] [--out FILE.json]

It compiles the train step of ``han_jax.training.devices`` for the default model, runs it
under ``jax.profiler.trace`` and sums the duration of every executed XLA op (the
trace's per-thunk events) by the ``op_name`` metadata XLA kept for it: the Flax
module path (``daily_encoders_personnel/layers_0/self_attn/...``), split into the
forward pass (``jvp``) and the backward pass (``transpose``). ``--depth`` is how many
module levels to keep; ``--filter`` lists only the ops whose op_name matches a
regular expression (e.g. ``daily_encoders_personnel/layers_0/``). The raw trace stays in ``--trace-dir`` for Perfetto or
TensorBoard. Op durations overlap when XLA runs ops concurrently, so the shares are
of summed op time, not of wall time.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--step", choices=("train", "eval", "test"), default="train")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--days", type=int, default=365)
    p.add_argument("--months", type=int, default=12)
    p.add_argument("--policy", default="f32")
    p.add_argument("--small", action="store_true", help="ModelConfig.small() instead of the default model")
    p.add_argument("--runs", type=int, default=3, help="profiled calls (durations are averaged)")
    p.add_argument("--depth", type=int, default=2, help="module path levels to group by")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--filter", default=None, help="regex on op_name: list the matching ops only")
    p.add_argument("--trace-dir", default=None)
    p.add_argument("--out", default=None, help="write the table as JSON")
    return p.parse_args(argv)


_OP_NAME = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?op_name="([^"]*)"')


def op_names(hlo_text: str) -> dict:
    """HLO instruction name -> its op_name metadata (the JAX/Flax name stack)."""
    out = {}
    for line in hlo_text.splitlines():
        m = _OP_NAME.match(line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def module_key(op_name: str, depth: int) -> tuple:
    """('forward'|'backward'|'other', module path cut at ``depth`` levels)."""
    phase = "backward" if "transpose(" in op_name else ("forward" if "jvp(" in op_name else "other")
    parts = [p for p in op_name.split("/")[1:] if p]
    # Drop the JAX transform wrappers; keep Flax module names (which start upper- or lower-case).
    mods = []
    for p in parts:
        p = re.sub(r"^(transpose|jvp|vmap|remat|checkpoint|pjit|jit)\((.*)\)$", r"\2", p)
        p = re.sub(r"^(transpose|jvp)\((.*)\)$", r"\2", p)
        mods.append(p)
    if mods and mods[0] == "MultiResolutionHAN":
        mods = mods[1:]
    return phase, "/".join(mods[:depth]) if mods else "(outside the model)"


def main(argv=None):
    args = parse_args(argv)
    import jax

    from benchmarks.bench_steps import schedule, synthetic_batch
    from han_jax.config import Config, ModelConfig, StepConfig
    from han_jax.core.precision import Policy
    from han_jax.training.devices import SingleDevice
    from han_jax.training.spec import StepSpec
    from han_jax.training.steps import create_train_state

    model = ModelConfig.small() if args.small else ModelConfig()
    spec = StepSpec.of(Config(model=model, step=StepConfig(policy=Policy.from_string(args.policy))))
    inputs, targets = synthetic_batch(model, args.batch, args.days, args.months)
    state = create_train_state(jax.random.PRNGKey(0), spec, inputs, schedule())
    steps = SingleDevice().steps(spec, schedule())
    fn = getattr(steps.compiled, args.step)
    extra = (steps.schedule,) if args.step == "train" else ()
    t0 = time.perf_counter()
    compiled = fn.lower(state, inputs, targets, *extra).compile()
    compile_s = time.perf_counter() - t0
    names = op_names(compiled.as_text())

    holder = [state]

    def call():
        out = compiled(holder[0], inputs, targets, *extra)
        jax.block_until_ready(out)
        if args.step == "train":
            holder[0] = out[0]  # the state is donated

    call()
    t0 = time.perf_counter()
    call()
    wall = time.perf_counter() - t0
    trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="han-jax-trace-")
    with jax.profiler.trace(trace_dir):
        for _ in range(args.runs):
            call()
    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True), key=os.path.getmtime)
    if not files:
        raise SystemExit(f"no trace file was written under {trace_dir}")
    events = json.load(gzip.open(files[-1]))["traceEvents"]

    by_module = collections.Counter()
    by_op = collections.Counter()
    total = 0.0
    for e in events:
        if e.get("ph") != "X" or e["name"] not in names:
            continue
        if args.filter and not re.search(args.filter, names[e["name"]]):
            continue
        dur = e["dur"] / 1e3 / args.runs  # ms per call
        key = module_key(names[e["name"]], args.depth)
        by_module[key] += dur
        by_op[(e["name"], names[e["name"]])] += dur
        total += dur

    rows = [
        {"phase": phase, "module": mod, "ms": ms, "share": ms / total}
        for (phase, mod), ms in by_module.most_common(args.top)
    ]
    print(f"# {args.step}_step, {'small' if args.small else 'default'} model, B={args.batch} T={args.days} "
          f"M={args.months} {args.policy}: wall {wall * 1e3:.0f} ms, summed op time {total:.0f} ms, "
          f"compile {compile_s:.1f} s, backend {jax.default_backend()}")
    print("\n| phase | module | ms/step | share |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['phase']} | {r['module']} | {r['ms']:.1f} | {100 * r['share']:.1f}% |")
    print("\n| op | ms/step | op_name |\n|---|---|---|")
    for (op, name), ms in by_op.most_common(args.top):
        print(f"| {op} | {ms:.1f} | {name[-130:]} |")
    print(f"\ntrace: {trace_dir}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "wall_ms": wall * 1e3, "op_total_ms": total, "modules": rows,
                       "ops": [{"op": o, "op_name": n, "ms": ms} for (o, n), ms in by_op.most_common(args.top)]},
                      f, indent=1)


if __name__ == "__main__":
    main()
