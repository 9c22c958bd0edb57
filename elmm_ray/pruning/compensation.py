"""Fitting the linear compensation of a removed attention sublayer (ELMM): ridge least
squares from the calibration states entering the layer to those after its attention
sublayer (see :class:`elmm_ray.models.surgery.LinearCompensation` for the parametrisation),
and the reconstruction errors that the prune report shows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from elmm_ray.models.surgery import CompensationFit


def fit_compensation(inputs: Tensor, outputs: Tensor, *, ridge: float = 1e-3, rank: int = 0,
                     bias: bool = True) -> CompensationFit:
    """Least squares ``outputs ~= inputs @ W + b`` with ``W = I + D``, ridge on ``D``.

    ``inputs``/``outputs``: ``(N, d)``. The penalty is ``ridge * mean(diag(X^T X))`` (scale
    free) times ``||D||^2`` with ``X`` the (centred, when fitting a bias) inputs, so the ridge
    pulls ``W`` towards the identity (plain removal). ``rank = r`` (``0 < r < d``) keeps the
    best rank-``r`` ``D`` for this data (reduced-rank regression: the full solution projected
    onto the top ``r`` right singular vectors of its fitted values ``X D``).
    """
    if inputs.shape != outputs.shape or inputs.dim() != 2:
        raise ValueError(f"inputs {tuple(inputs.shape)} and outputs {tuple(outputs.shape)} "
                         "must both be (N, d)")
    x = inputs.detach().to(torch.float64)
    target = outputs.detach().to(torch.float64) - x
    dim = x.shape[1]
    if rank >= dim:
        rank = 0
    x_mean = x.mean(0) if bias else torch.zeros(dim, dtype=x.dtype)
    t_mean = target.mean(0) if bias else torch.zeros(dim, dtype=x.dtype)
    xc, tc = x - x_mean, target - t_mean
    gram = xc.T @ xc
    scale = float(gram.diagonal().mean()) or 1.0
    # ridge penalty plus a tiny jitter so that rank-deficient inputs still solve
    system = gram + (max(ridge, 0.0) + 1e-10) * scale * torch.eye(dim, dtype=x.dtype)
    delta = torch.linalg.solve(system, xc.T @ tc)
    down = up = None
    if rank:
        _, _, vh = torch.linalg.svd(xc @ delta, full_matrices=False)
        basis = vh[:rank].T  # (d, r)
        down, up = delta @ basis, basis.T
        delta = down @ up
    offset = (t_mean - x_mean @ delta) if bias else None
    as32 = (lambda t: None if t is None else t.to(torch.float32))  # noqa: E731
    return CompensationFit(delta=as32(delta), bias=as32(offset), rank=rank, down=as32(down),
                           up=as32(up))


def reconstruction_errors(inputs: Tensor, outputs: Tensor, fit: CompensationFit) -> dict:
    """Errors of plain removal (``h_mid ~= h``) and of the compensation (``h @ W + b``).

    ``*_fro``: Frobenius norm over all tokens; ``*_mse``: mean over tokens of the squared
    L2 error per token; ``reduction``: ``1 - compensated_fro / removal_fro``.
    """
    x = inputs.to(torch.float32)
    y = outputs.to(torch.float32)
    plain = y - x
    comp = y - fit.predict(x)
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
