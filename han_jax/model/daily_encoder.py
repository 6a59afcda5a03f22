"""Stage 1: DailySourceEncoder, one per daily source (pre-norm causal transformer)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from han_jax.core.precision import Policy
from han_jax.model.attention import combine_masks
from han_jax.model.common import Linear, embed, gelu, layer_norm, normal, sinusoidal_table, unmask_first_if_all_masked
from han_jax.model.dropout import Dropout
from han_jax.model.stacking import declare_params
from han_jax.model.transformer import PreNormEncoderLayer, causal_valid


def soft_compress(x):
    """|x| > 100 -> +-(100 + log1p(|x|/100 - 1)); the inner value is kept finite everywhere."""
    inner = 100.0 + jnp.log1p(jnp.maximum(jnp.abs(x) / 100.0 - 1.0, 0.0))
    return jnp.where(x > 100, inner, jnp.where(x < -100, -inner, x))


def _encoder_layer(*, nhead: int, d_model: int, dropout: float, policy: Policy, **kwargs) -> PreNormEncoderLayer:
    """One layer of the encoder's stack (FFN width 4 * d_model, xavier Linears).

    The module whose parameters :class:`DailySourceEncoder` declares and
    :func:`daily_layers_fn` applies.
    """
    return PreNormEncoderLayer(
        num_heads=nhead, dim_feedforward=4 * d_model, dropout=dropout, policy=policy, xavier=True, **kwargs
    )


def daily_layers_fn(*, num_layers: int, nhead: int, d_model: int, dropout: float, policy: Policy,
                    deterministic: bool, causal: bool, attention_block: int = 64, remat: bool = False):
    """The encoder's transformer stack as a pure function of its parameters.

    ``run(params, h [B,T,D], key_valid [B,T], key)`` applies ``layers_0..N-1`` and
    ``output_norm`` from ``params`` (the tree :class:`DailySourceEncoder` declares);
    ``key`` is the dropout key (None when deterministic). Pure, so that
    ``MultiResolutionHAN`` can ``jax.vmap`` it over the stacked parameters of all
    daily sources (``han_jax.model.stacking``).
    """
    # Named as the parameters are, so that traces and op names read as the stored tree.
    layers = [
        _encoder_layer(
            nhead=nhead, d_model=d_model, dropout=dropout, policy=policy, deterministic=deterministic,
            band=(None, 0) if causal else None, block_size=attention_block, name=f"layers_{i}", parent=None,
        )
        for i in range(num_layers)
    ]
    norm = layer_norm(policy=policy, name="output_norm", parent=None)

    def apply_layer(layer, p, h, valid, key):
        return layer.apply({"params": p}, h, valid, rngs=None if key is None else {"dropout": key})

    if remat:
        apply_layer = jax.checkpoint(apply_layer, static_argnums=(0,))

    def run(params, h, key_valid, key=None):
        valid = combine_masks(key_valid, causal_valid(h.shape[1]) if causal else None)
        for i, layer in enumerate(layers):
            h = apply_layer(layer, params[layer.name], h, valid, None if key is None else jax.random.fold_in(key, i))
        return norm.apply({"params": params["output_norm"]}, h)

    return run


class DailySourceEncoder(nn.Module, kw_only=True):
    """x, m: [B, T, F] -> [B, T, D].

    ``feature_embedding`` is created (the original has it) but, as in the original,
    never used: it never receives a gradient. The global ``|h| > 1000`` clamp looks at
    the whole batch, as in the original (so an extreme future value could in principle
    change past outputs; ordinary inputs never reach it).

    The parameters are the original's, under the same names. With
    ``defer_layers`` the module returns ``(h, key_valid, layer_params)`` after the
    per-source input embedding instead of running its transformer stack: the
    parent runs the stacks of all sources at once (:func:`daily_layers_fn` under
    ``jax.vmap``), because they have the same shapes while the embeddings do not.
    """

    n_features: int
    d_model: int
    nhead: int
    num_layers: int
    dropout: float
    causal: bool
    max_len: int
    policy: Policy
    remat: bool = False
    attention_block: int = 64  # query block of the causal attention (0: dense)
    defer_layers: bool = False

    @nn.compact
    def __call__(self, x, m, *, deterministic: bool):
        d, pol = self.d_model, self.policy
        t = x.shape[1]
        x = jnp.where(m, x, 0.0).astype(jnp.float32)
        x = soft_compress(x)
        h = Linear(features=d, policy=pol, xavier=True, name="feature_projection")(x)
        h = gelu(layer_norm(policy=pol, name="feature_norm")(h))
        h = Dropout(rate=self.dropout)(h, deterministic=deterministic)
        h = jnp.where(jnp.any(jnp.abs(h) > 1000), jnp.clip(h, -100, 100), h)

        obs = jnp.any(m, axis=-1)  # [B, T]
        token = self.param("no_observation_token", normal(0.02), (1, 1, d), pol.param_dtype)
        h = jnp.where(obs[..., None], h, token.astype(h.dtype))
        # Unused in the original's forward; kept for a 1:1 parameter mapping.
        self.param("feature_embedding", normal(0.02), (self.n_features, d), pol.param_dtype)
        h = h + embed(num_embeddings=2, features=d, policy=pol, std=0.02, name="observation_status_embedding")(
            obs.astype(jnp.int32)
        )
        h = h + jnp.asarray(sinusoidal_table(self.max_len, d)[:t])
        h = Dropout(rate=self.dropout)(h, deterministic=deterministic)
        key_valid = unmask_first_if_all_masked(obs)

        # Unbound templates (parent=None): only their parameters are declared here.
        template = _encoder_layer(
            nhead=self.nhead, d_model=d, dropout=self.dropout, policy=pol, deterministic=True, parent=None
        )
        norm = layer_norm(policy=pol, parent=None)
        example = jnp.zeros((1, 1, d), jnp.float32)
        params = {f"layers_{i}": declare_params(self, f"layers_{i}", template, example, None)
                  for i in range(self.num_layers)}
        params["output_norm"] = declare_params(self, "output_norm", norm, example)
        if self.defer_layers:
            return h, key_valid, params
        run = daily_layers_fn(
            num_layers=self.num_layers, nhead=self.nhead, d_model=d, dropout=self.dropout, policy=pol,
            deterministic=deterministic, causal=self.causal, attention_block=self.attention_block, remat=self.remat,
        )
        return run(params, h, key_valid, None if deterministic else self.make_rng("dropout"))
