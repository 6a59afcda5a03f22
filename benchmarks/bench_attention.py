"""Attention alone, this checkout against other versions of ``han_jax/model/attention.py``, in one process.

Usage::

    python benchmarks/bench_attention.py [--against NAME=FILE ...] [--fused] [--rounds 60] [--steps] [--out FILE.json]

Settings of the default model (B=8, T=365, d_model=128, f32), each a jitted program:

* ``daily layer, train``: one causal daily encoder layer (``daily_layers_fn``, 8 heads of 16,
  query blocks of 64), value and gradient with dropout, as the train step runs it 12 times;
* ``daily fusion attention, train``: the daily fusion's self-attention over 4 sources at each of
  B*T days (``MultiheadAttention`` on [2920, 4, 128]), value and gradient with dropout;
* ``daily stack, eval``: a 3-layer daily encoder stack forward, deterministic (the eval path);
* with ``--steps``, the default model's whole ``eval_step`` and ``train_step`` (M=12), a quarter as
  many calls.

Each ``--against NAME=FILE`` is another ``attention.py`` (e.g. ``git show REV:han_jax/model/attention.py
> /tmp/before.py``): while that variant is built, its ``AttentionCore`` replaces this checkout's
(the encoder layer keeps this checkout's ``MultiheadAttention`` around it), and the fusion attention
is its ``MultiheadAttention``. ``--fused`` adds this checkout with ``AttentionCore(fused=True)``:
attention without dropout through ``jax.nn.dot_product_attention`` instead of the explicit path,
which only the eval settings use. Every variant is compiled first; then the variants are called in turn,
``--rounds`` times, so that a noisy host slows them alike. Prints a markdown table (median and
minimum ms, and each variant's largest difference from this checkout's result) and, with
``--out``, JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
import types

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

B, T, D, HEADS, SOURCES = 8, 365, 128, 8, 4


def load_attention(name: str, path: str):
    """Another version of ``han_jax/model/attention.py`` as a module of its own."""
    spec = importlib.util.spec_from_file_location(f"bench_attention_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # flax dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def programs(module, steps: bool = False):
    """{setting: call(round) -> outputs}, each compiled with ``module``'s attention."""
    import jax
    import jax.numpy as jnp

    from han_jax.core.precision import Policy
    from han_jax.model import attention
    from han_jax.model.daily_encoder import DailySourceEncoder, daily_layers_fn

    policy = Policy()
    saved = attention.AttentionCore
    attention.AttentionCore = module.AttentionCore  # looked up when this checkout's layer is applied
    try:
        x = jax.random.normal(jax.random.PRNGKey(1), (B, T, 5))
        m = jax.random.uniform(jax.random.PRNGKey(2), (B, T, 5)) > 0.3
        key = jax.random.PRNGKey(5)
        out = {}
        for layers, deterministic in ((1, False), (3, True)):
            enc = DailySourceEncoder(n_features=5, d_model=D, nhead=HEADS, num_layers=layers, dropout=0.1,
                                     causal=True, max_len=T, policy=policy, defer_layers=True)
            init = enc.init({"params": jax.random.PRNGKey(0), "dropout": key}, x, m, deterministic=True)
            h, key_valid, params = enc.apply(init, x, m, deterministic=True)
            run = daily_layers_fn(num_layers=layers, nhead=HEADS, d_model=D, dropout=0.1, policy=policy,
                                  deterministic=deterministic, causal=True)
            if deterministic:
                fn = jax.jit(lambda p, h, run=run, kv=key_valid: run(p, h, kv)).lower(params, h).compile()
                out["daily stack, eval"] = lambda r, fn=fn, a=(params, h): fn(*a)
            else:
                def loss(p, h, k, run=run, kv=key_valid):
                    return jnp.sum(run(p, h, kv, k) ** 2)
                fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(params, h, key).compile()
                out["daily layer, train"] = lambda r, fn=fn, a=(params, h): fn(*a, jax.random.fold_in(key, r))
        z = jax.random.normal(jax.random.PRNGKey(3), (B * T, SOURCES, D))
        mha = module.MultiheadAttention(num_heads=HEADS, dropout=0.1, policy=policy)
        params = mha.init({"params": jax.random.PRNGKey(0), "dropout": key}, z, z, z, deterministic=False)

        def fusion_loss(p, z, k):
            y, _ = mha.apply(p, z, z, z, deterministic=False, rngs={"dropout": k})
            return jnp.sum(y ** 2)

        fn = jax.jit(jax.value_and_grad(fusion_loss, argnums=(0, 1))).lower(params, z, key).compile()
        out["daily fusion attention, train"] = lambda r, fn=fn, a=(params, z): fn(*a, jax.random.fold_in(key, r))
        if steps:
            out.update(whole_steps())
        return out
    finally:
        attention.AttentionCore = saved


def whole_steps():
    """The default model's train and eval steps (B=8, T=365, M=12), as ``bench_steps.py`` builds them."""
    import jax

    from benchmarks.bench_steps import schedule, synthetic_batch
    from han_jax.config import Config, ModelConfig, StepConfig
    from han_jax.training.devices import SingleDevice
    from han_jax.training.spec import StepSpec
    from han_jax.training.steps import create_train_state

    jax.clear_caches()  # the steps' traces are cached by spec, not by the attention module they used
    model = ModelConfig()
    spec = StepSpec.of(Config(model=model, step=StepConfig()))
    inputs, targets = synthetic_batch(model, B, T, 12)
    state = create_train_state(jax.random.PRNGKey(0), spec, inputs, schedule())
    built = SingleDevice().steps(spec, schedule())
    evaluate = built.compiled.eval.lower(state, inputs, targets).compile()
    train = built.compiled.train.lower(state, inputs, targets, built.schedule).compile()
    holder = [state]

    def train_call(r):
        holder[0], metrics = train(holder[0], inputs, targets, built.schedule)  # the state is donated
        return metrics

    return {"eval step, default model": lambda r: evaluate(holder[0], inputs, targets),
            "train step, default model": train_call}


def fused_variant():
    """This checkout's attention with ``fused=True`` as the default, in the shape of an attention module."""
    from han_jax.model import attention

    class FusedCore(attention.AttentionCore):
        fused: bool = True

    return types.SimpleNamespace(AttentionCore=FusedCore, MultiheadAttention=attention.MultiheadAttention)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--against", action="append", default=[], metavar="NAME=FILE",
                    help="another attention.py to measure (repeatable)")
    ap.add_argument("--fused", action="store_true", help="also this checkout with AttentionCore(fused=True)")
    ap.add_argument("--rounds", type=int, default=60, help="calls of each variant, in turn (default 60)")
    ap.add_argument("--steps", action="store_true",
                    help="also the default model's whole train and eval steps (about 1 min of compile per variant)")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)
    variants = {}
    for item in args.against:
        name, sep, path = item.partition("=")
        if not sep or not os.path.isfile(path):
            ap.error(f"--against {item!r}: expected NAME=FILE of an attention.py")
        if name in variants or name in ("this checkout", "fused"):
            ap.error(f"--against {item!r}: the name {name!r} is taken; give each variant its own")
        variants[name] = path

    import jax
    import numpy as np

    from han_jax.model import attention

    built = {"this checkout": programs(attention, args.steps)}
    if args.fused:
        built["fused"] = programs(fused_variant(), args.steps)
    for name, path in variants.items():
        built[name] = programs(load_attention(name, path), args.steps)
    settings = list(built["this checkout"])
    results = {}
    for setting in settings:
        times = {name: [] for name in built}
        # The first call of each (a warm-up) is the one compared: same inputs and keys for every variant.
        first = {name: jax.device_get(jax.block_until_ready(progs[setting](0))) for name, progs in built.items()}
        reference = first["this checkout"]
        rounds = args.rounds if "default model" not in setting else max(args.rounds // 4, 5)
        for r in range(1, rounds + 1):
            for name, progs in built.items():
                t0 = time.perf_counter()
                jax.block_until_ready(progs[setting](r))
                times[name].append(time.perf_counter() - t0)
        results[setting] = {
            name: {"median_ms": float(np.median(t)) * 1e3, "min_ms": float(np.min(t)) * 1e3,
                   "max_abs_diff": max(float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
                                       for a, b in zip(jax.tree.leaves(first[name]), jax.tree.leaves(reference)))}
            for name, t in times.items()}
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__}"
    print(f"Machine: {machine}; B={B}, T={T}, d_model={D}, {HEADS} heads, f32; {args.rounds} calls each, in turn "
          f"({max(args.rounds // 4, 5)} for the whole steps)\n")
    print("| setting | attention.py | median ms | min ms | largest difference from this checkout |")
    print("|---|---|---|---|---|")
    for setting, rows in results.items():
        for name, r in rows.items():
            print(f"| {setting} | {name} | {r['median_ms']:.2f} | {r['min_ms']:.2f} | {r['max_abs_diff']:.2g} |")
    out = {"machine": machine, "against": variants, "fused": args.fused, "rounds": args.rounds, "results": results}
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
