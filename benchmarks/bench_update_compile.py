"""What the optimiser update costs the train step's compile: on the parameter trees, or on flat group vectors.

Usage::

    python benchmarks/bench_update_compile.py [--small] [--out FILE.json]

Compiles, alone, the update part of ``han_jax.training.steps.train_step`` for the default model (``--small``: the
small preset's): ``make_optimizer(spec).update`` (``apply_if_finite`` around ``MultiSteps`` around the AdamW
groups), ``optax.apply_updates`` and the gradient norm, three ways: optax handed the parameter trees (several small
ops per leaf); one flat vector per group with the trees rebuilt by ``ravel_pytree``'s static slices; and as
``train_step`` runs it, the trees rebuilt by ``from_optimizer_view``'s run-time-offset slices. Prints the compile
time, the number of fusions and of distinct fused computations (the kernels XLA:CPU compiles,
``han_jax.testing.compiled_kernels``) of each as a markdown table; ``--out`` writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="ModelConfig.small() instead of the default model")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)

    import jax
    import optax
    from jax.flatten_util import ravel_pytree

    from han_jax.config import Config, ModelConfig
    from han_jax.testing import compiled_kernels, random_batch
    from han_jax.training.spec import StepSpec
    from han_jax.training.steps import create_train_state, from_optimizer_view, make_optimizer, optimizer_view

    model = ModelConfig.small() if args.small else ModelConfig()
    spec = StepSpec.of(Config(model=model))
    inputs, _ = random_batch(model, b=1, t=60, m=3, seed=0)  # only the parameter shapes matter
    state = create_train_state(jax.random.PRNGKey(0), spec, inputs)
    trainable = {"model": state.params, "log_vars": state.log_vars}
    tx = make_optimizer(spec)

    def on_trees(trainable, grads, opt_state):
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, optax.tree.norm(grads["model"])

    def on_flat_groups(rebuild):
        def update(trainable, grads, opt_state):
            flat, grads = optimizer_view(trainable), optimizer_view(grads)
            updates, opt_state = tx.update(grads, opt_state, flat)
            new = rebuild(optax.apply_updates(flat, updates), trainable)
            return new, opt_state, optax.tree.norm(grads["model"])
        return update

    def static_slices(flat, like):
        return {group: ravel_pytree(like[group])[1](vector) for group, vector in flat.items()}

    rows = []
    for name, fn, opt_state in (
            ("parameter trees", on_trees, tx.init(trainable)),
            ("flat group vectors, static slices back", on_flat_groups(static_slices), state.opt_state),
            ("flat group vectors, run-time-offset slices back (train_step)",
             on_flat_groups(from_optimizer_view), state.opt_state)):
        t0 = time.perf_counter()
        compiled = jax.jit(fn).lower(trainable, trainable, opt_state).compile()
        seconds = time.perf_counter() - t0
        fusions, kernels = compiled_kernels(compiled.as_text())
        rows.append({"update": name, "compile_s": round(seconds, 1), "fusions": fusions, "kernels": kernels})
        del compiled
    leaves = len(jax.tree_util.tree_leaves(trainable))
    print(f"{'small' if args.small else 'default'} model, {leaves} parameter leaves, backend {jax.default_backend()}\n")
    print("| update on | compile (s) | fusions | distinct kernels |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['update']} | {r['compile_s']} | {r['fusions']} | {r['kernels']} |")
    result = {"model": "small" if args.small else "default", "leaves": leaves, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
