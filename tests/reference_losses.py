"""A plain numpy reference of the original's losses, written the original's way.

It selects valid rows with boolean indexing and branches on ``.any()``, with
torch's semantics spelled out (``var`` is ddof=1 and NaN for one element,
``cross_entropy`` with weights and label smoothing, ``kl_div`` batchmean), so
it is an independent check of han-jax's masked, jit-safe implementation.
Padding rows are removed before anything, as if they were never in the batch.
"""

from __future__ import annotations

import math

import numpy as np

PHASE_TO_COARSE = np.array([0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 3])


def _softmax(x, axis=-1):
    x = x - x.max(axis=axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=axis, keepdims=True)


def _log_softmax(x, axis=-1):
    x = x - x.max(axis=axis, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def _torch_var(x):
    x = np.asarray(x, np.float64).ravel()
    return np.nan if x.size < 2 else x.var(ddof=1)


def torch_cross_entropy(logits, labels, weight, label_smoothing):
    k = logits.shape[-1]
    nlp = -_log_softmax(logits)
    rows = np.arange(len(labels))
    num = ((1 - label_smoothing) * weight[labels] * nlp[rows, labels]
           + label_smoothing / k * (nlp * weight[None]).sum(-1))
    return num.sum() / weight[labels].sum()


def softplus(x):
    return np.logaddexp(0.0, x)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def zinb_nll(y, pi, mu, theta, eps=1e-8, max_loss=20.0):
    from scipy.special import gammaln

    pi = np.clip(pi, eps, 1 - eps)
    mu = np.maximum(mu, eps)
    theta = np.maximum(theta, eps)
    log_nb_zero = theta * (np.log(theta) - np.log(theta + mu))
    log_prob_zero = np.logaddexp(np.log(pi), np.log(1 - pi) + log_nb_zero)
    k = np.maximum(y, 0)
    log_nb = (
        gammaln(k + theta) - gammaln(theta) - gammaln(k + 1)
        + theta * (np.log(theta) - np.log(theta + mu)) + k * (np.log(mu) - np.log(theta + mu))
    )
    is_zero = (y == 0).astype(float)
    log_prob = is_zero * log_prob_zero + (1 - is_zero) * (np.log(1 - pi) + log_nb)
    nll = np.clip(-log_prob, 0, max_loss)
    nll = np.where(np.isnan(nll), max_loss, nll)
    return nll.mean()


def bce_with_logits(x, y):
    return np.mean(np.maximum(x, 0) - x * y + np.log1p(np.exp(-np.abs(x))))


def reference_losses(outputs, targets, daily_forecast_latent=True):
    """outputs/targets: dicts of numpy arrays (targets may hold None)."""
    keep = np.asarray(targets["sample_mask"], bool)
    o = {k: np.asarray(v, np.float64)[keep] for k, v in outputs.items()}
    o = {k: np.nan_to_num(v, nan=0.0) if np.isnan(outputs[k]).any() else v for k, v in o.items()}
    t = {k: (None if v is None else np.asarray(v)[keep]) for k, v in targets.items()}
    losses = {}

    # regime
    logits = o["regime_logits"]
    m, k = logits.shape[1], logits.shape[2]
    last = logits[:, -1]
    if t["phase_index"] is not None:
        phase = np.clip(t["phase_index"], 0, 10)
        labels = PHASE_TO_COARSE[phase] if k != 11 else phase
        valid = t["phase_valid"].astype(bool)
        if valid.any():
            vt = labels[valid]
            counts = np.maximum(np.bincount(vt, minlength=k).astype(float), 1)
            w = 1 / counts
            w = w / w.sum() * k
            cl = np.clip(last[valid], -50, 50)
            ce = torch_cross_entropy(cl, vt, w, 0.1)
            p = _softmax(cl)
            ent = -(p * np.log(p + 1e-8)).sum(-1).mean()
            mp = p.mean(0)
            div = -(mp * np.log(mp + 1e-8)).sum()
            loss = np.nan_to_num(max(ce, 0.05), nan=0.0)
            loss += 0.3 * max(0.5 * math.log(k) - ent, 0) + 0.3 * max(0.7 * math.log(k) - div, 0)
            losses["regime"] = loss
        else:
            losses["regime"] = (last**2).mean() * 1e-6
    elif m >= 2:
        lt, lp = _log_softmax(logits[:, 1:]), _log_softmax(logits[:, :-1])
        pt, pp = np.exp(lt), np.exp(lp)
        b = logits.shape[0]
        kl_f = (pt * (lt - lp)).sum() / b
        kl_b = (pp * (lp - lt)).sum() / b
        ent = -(pt * np.log(np.maximum(pt, 1e-8))).sum(-1).mean()
        losses["regime"] = 0.1 * (kl_f + kl_b) / 2 + 0.1 * abs(0.5 * math.log(k) - ent)
    else:
        losses["regime"] = (last**2).mean() * 1e-6

    # transition
    s = o["anomaly_score"][:, -1, 0]
    if t["is_transition"] is not None and t["phase_valid"] is not None and t["phase_valid"].any():
        v = t["phase_valid"].astype(bool)
        labels = t["is_transition"][v].astype(float)
        losses["transition"] = np.nan_to_num(bce_with_logits(np.clip(s[v], -50, 50), labels))
    else:
        losses["transition"] = (s**2).mean() * 1e-6

    # casualty
    cp, cv = o["casualty_pred"][:, -1], o["casualty_var"][:, -1]
    pi_reg = ((sigmoid(cp[:, 0]) - 0.5) ** 2).mean()
    mu_reg = (cp[:, 1] ** 2).mean() * 0.01
    if t["fatalities"] is not None:
        v = t["casualty_valid"].astype(bool)
        if v.any():
            pi = sigmoid(np.clip(cp[v, 0], -10, 10))
            mu = np.exp(np.clip(cp[v, 1], -5, 12))
            theta = np.clip(softplus(cv[v, 0]), 0.1, 100)
            losses["casualty"] = zinb_nll(t["fatalities"][v] / 1000.0, pi, mu, theta)
        else:
            theta_reg = ((softplus(cv[:, 0]) - 1) ** 2).mean()
            losses["casualty"] = (pi_reg + mu_reg + theta_reg) * 0.01
    else:
        losses["casualty"] = (pi_reg + mu_reg) * 0.01

    # anomaly
    if t["anomaly"] is not None:
        v = t["anomaly_valid"].astype(bool)
        if v.any():
            p = np.clip(s[v], -10, 10)
            y = t["anomaly"][v].astype(np.float64)
            loss = np.nan_to_num(((p - y) ** 2).mean())
            vp, vt = _torch_var(p), _torch_var(y)
            pen = max(0.5 - vp / (vt + 1e-6), 0) if vt > 1e-6 else 0.0
            losses["anomaly"] = loss + 0.1 * pen
        else:
            losses["anomaly"] = (s**2).mean() * 1e-6
    else:
        losses["anomaly"] = (s**2).mean() * 0.01

    # forecast
    fp = o["forecast_pred"]
    m = fp.shape[1]
    if t["forecast_targets"] is not None:
        kk = min(fp.shape[-1], t["forecast_targets"].shape[-1])
        p = fp[..., :kk]
        y = t["forecast_targets"][..., :kk].astype(np.float64)
        v = t["forecast_masks"][..., :kk].astype(bool)
        if v.any():
            pv, yv = p[v], y[v]
            mse = ((pv - yv) ** 2).mean()
            vp, vt = _torch_var(pv), _torch_var(yv)
            pen = 0.5 * max(0.3 - vp / (vt + 1e-6), 0) if vt > 1e-6 else 0.0
            if m >= 2:
                smooth = ((p[:, 1:] - p[:, :-1]) ** 2).mean() * 0.01
                tv = p.var(axis=1, ddof=1).mean()
                tpen = max(0.1 - tv, 0) * 0.1
            else:
                smooth = tpen = 0.0
            losses["forecast"] = max(mse + smooth + pen + tpen, 0.01)
        else:
            losses["forecast"] = (fp**2).mean() * 1e-6
    elif m >= 2:
        smooth = ((fp[:, 1:] - fp[:, :-1]) ** 2).mean()
        var = fp.var(axis=1, ddof=1).mean()
        losses["forecast"] = smooth * 0.01 + max(0.5 - var, 0) * 0.1
    else:
        losses["forecast"] = (fp**2).mean() * 1e-6

    # daily forecast
    if "daily_forecast_pred" in o:
        d = o["daily_forecast_pred"]
        if daily_forecast_latent:
            if d.shape[1] > 1:
                losses["daily_forecast"] = ((d[:, 1:] - d[:, :-1]) ** 2).mean() + (d**2).mean() * 0.01
            else:
                losses["daily_forecast"] = (d**2).mean() * 0.01
        elif t.get("daily_forecast_targets") is not None:
            y = t["daily_forecast_targets"]
            v = y > -900
            if t.get("daily_forecast_masks") is not None:
                v = v & t["daily_forecast_masks"].astype(bool)
            losses["daily_forecast"] = ((d[v] - y[v]) ** 2).mean() if v.any() else (d**2).mean() * 1e-6
        else:
            losses["daily_forecast"] = (d**2).mean() * 1e-6
    return losses


def reference_aggregate(losses, log_vars, task_names):
    total, reg, n = 0.0, 0.0, 0
    for task in task_names:
        if task not in losses:
            continue
        loss = float(losses[task])
        if not np.isfinite(loss) or loss == 0:
            continue
        lv = float(np.clip(log_vars[task], -2, 2))
        total += 0.5 * np.exp(-lv) * min(loss, 1e6) + 0.5 * lv
        reg += float(log_vars[task]) ** 2
        n += 1
    if n == 0:
        return sum(float(v) ** 2 for v in log_vars.values()) * 1e-6
    return total + 0.01 * reg


def reference_temporal_regularization(casualty_pred, regime_logits):
    def corr(pred):
        flat = pred.mean(-1)
        pos = np.arange(flat.shape[1], dtype=np.float64)
        pos = (pos - pos.mean()) / (pos.std(ddof=1) + 1e-8)
        z = (flat - flat.mean(-1, keepdims=True)) / (flat.std(-1, ddof=1, keepdims=True) + 1e-8)
        return np.maximum((z * pos).mean(-1), 0).mean()

    cas_corr = corr(casualty_pred)
    deltas = casualty_pred[:, 1:] - casualty_pred[:, :-1]
    cas_smooth = np.maximum(0.1 - (deltas**2).mean(1), 0).mean()
    reg_corr = corr(_softmax(regime_logits))
    reference_temporal_regularization.regime_corr = reg_corr
    return 0.01 * cas_corr + 0.001 * cas_smooth + 0.01 * reg_corr
