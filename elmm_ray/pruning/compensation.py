"""Fitting the linear compensation of a removed attention sublayer (ELMM): ridge least
squares from the calibration states entering the layer to those after its attention
sublayer (see :class:`elmm_ray.models.surgery.LinearCompensation` for the parametrisation),
and the reconstruction errors that the prune report shows. With token mixing the inputs
also include the causal running mean of the states (``context``), whose map ``C`` is fitted
jointly with ``D``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from elmm_ray.models.surgery import CompensationFit


def fit_compensation(inputs: Tensor, outputs: Tensor, *, ridge: float = 1e-3, rank: int = 0,
                     bias: bool = True, context: Tensor | None = None) -> CompensationFit:
    """Least squares ``outputs ~= inputs @ W + b`` with ``W = I + D``, ridge on ``D``; with
    ``context`` (the causal running means of the states, row for row with ``inputs``)
    ``outputs ~= inputs @ W + context @ C + b``, ridge on ``D`` and ``C``.

    ``inputs``/``outputs``/``context``: ``(N, d)``. The penalty is ``ridge *
    mean(diag(X^T X))`` (scale free) times ``||D||^2 (+ ||C||^2)`` with ``X`` the (centred,
    when fitting a bias) regressors, so the ridge pulls ``W`` towards the identity (plain
    removal). ``rank = r`` (``0 < r < d``) keeps the best rank-``r`` map for this data
    (reduced-rank regression: the full solution projected onto the top ``r`` right singular
    vectors of its fitted values; ``D`` and ``C`` share that output basis ``up``).
    """
    if inputs.shape != outputs.shape or inputs.dim() != 2:
        raise ValueError(f"inputs {tuple(inputs.shape)} and outputs {tuple(outputs.shape)} "
                         "must both be (N, d)")
    if context is not None and context.shape != inputs.shape:
        raise ValueError(f"context {tuple(context.shape)} must have the inputs' shape "
                         f"{tuple(inputs.shape)}")
    x = inputs.detach().to(torch.float64)
    target = outputs.detach().to(torch.float64) - x
    dim = x.shape[1]
    if rank >= dim:
        rank = 0
    regressors = x if context is None else torch.cat(
        [x, context.detach().to(torch.float64)], dim=1)
    width = regressors.shape[1]
    r_mean = regressors.mean(0) if bias else torch.zeros(width, dtype=x.dtype)
    t_mean = target.mean(0) if bias else torch.zeros(dim, dtype=x.dtype)
    xc, tc = regressors - r_mean, target - t_mean
    gram = xc.T @ xc
    scale = float(gram.diagonal().mean()) or 1.0
    # ridge penalty plus a tiny jitter so that rank-deficient inputs still solve
    system = gram + (max(ridge, 0.0) + 1e-10) * scale * torch.eye(width, dtype=x.dtype)
    coef = torch.linalg.solve(system, xc.T @ tc)  # (d or 2d, d)
    down = up = None
    if rank:
        _, _, vh = torch.linalg.svd(xc @ coef, full_matrices=False)
        basis = vh[:rank].T  # (d, r)
        down, up = coef @ basis, basis.T
        coef = down @ up
    offset = (t_mean - r_mean @ coef) if bias else None
    as32 = (lambda t: None if t is None else t.to(torch.float32))  # noqa: E731
    mixed = context is not None
    return CompensationFit(
        delta=as32(coef[:dim]), bias=as32(offset), rank=rank,
        down=as32(down[:dim]) if rank else None, up=as32(up),
        context=as32(coef[dim:]) if mixed else None,
        context_down=as32(down[dim:]) if rank and mixed else None)


def reconstruction_errors(inputs: Tensor, outputs: Tensor, fit: CompensationFit,
                          context: Tensor | None = None) -> dict:
    """Errors of plain removal (``h_mid ~= h``) and of the compensation (``h @ W + b``, plus
    ``context @ C`` for a token-mixing fit, which needs ``context``).

    ``*_fro``: Frobenius norm over all tokens; ``*_mse``: mean over tokens of the squared
    L2 error per token; ``reduction``: ``1 - compensated_fro / removal_fro``.
    """
    x = inputs.to(torch.float32)
    y = outputs.to(torch.float32)
    plain = y - x
    comp = y - fit.predict(x, context)
    n = max(1, x.shape[0])
    removal_fro = float(torch.linalg.norm(plain))
    comp_fro = float(torch.linalg.norm(comp))
    return {
        "removal_fro": removal_fro,
        "compensated_fro": comp_fro,
        "removal_mse": removal_fro**2 / n,
        "compensated_mse": comp_fro**2 / n,
        "reduction": 1.0 - comp_fro / removal_fro if removal_fro > 0 else 0.0,
        "tokens": int(x.shape[0]),
    }
