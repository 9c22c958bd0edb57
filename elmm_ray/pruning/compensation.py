"""Linear compensation of a removed attention sublayer (ELMM).

A decoder layer computes ``h_mid = h + attn(norm(h))``. When its attention is pruned the
layer computes ``h_mid ~= h @ W + b`` instead, with ``W = I + D`` fitted by ridge least
squares on calibration states. :class:`LinearCompensation` stands in for ``self_attn``
and returns ``h @ D + b`` (the decoder adds the residual ``h`` itself); the layer's
``input_layernorm`` becomes an identity so that the module sees the un-normed ``h``.
Parametrising the deviation ``D`` from the identity keeps the residual stream exact, makes
the ridge shrink ``W`` towards plain removal (``W = I``), and lets a rank-``r`` variant
store ``D = down @ up`` (``2 d r`` numbers instead of ``d^2``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


class LinearCompensation(nn.Module):
    """Replacement of a decoder layer's ``self_attn``: ``h -> (h @ D + b, None)``.

    ``rank = 0``: ``D`` is a full ``d x d`` parameter (``delta``); ``rank = r``:
    ``D = down (d x r) @ up (r x d)``. ``weight`` gives the full ``W = I + D``.
    """

    def __init__(self, hidden_size: int, rank: int = 0, bias: bool = True,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None
                 ) -> None:
        super().__init__()
        if rank < 0 or rank > hidden_size:
            raise ValueError(f"compensation rank must be in [0, {hidden_size}], got {rank}")
        self.hidden_size, self.rank = hidden_size, rank
        kw = {"dtype": dtype, "device": device}
        if rank:
            self.down = nn.Parameter(torch.zeros(hidden_size, rank, **kw))
            self.up = nn.Parameter(torch.zeros(rank, hidden_size, **kw))
        else:
            self.delta = nn.Parameter(torch.zeros(hidden_size, hidden_size, **kw))
        self.bias = nn.Parameter(torch.zeros(hidden_size, **kw)) if bias else None

    @property
    def has_bias(self) -> bool:
        return self.bias is not None

    def delta_matrix(self) -> Tensor:
        """``D = W - I``."""
        return self.down @ self.up if self.rank else self.delta

    @property
    def weight(self) -> Tensor:
        """The full map ``W = I + D`` of ``h_mid = h @ W + b``."""
        delta = self.delta_matrix()
        return torch.eye(self.hidden_size, dtype=delta.dtype, device=delta.device) + delta

    def forward(self, hidden_states: Tensor, *args: object, **kwargs: object
                ) -> tuple[Tensor, None]:
        """Same call and return shape as ``LlamaAttention`` (extra arguments are ignored)."""
        if self.rank:
            out = (hidden_states @ self.down) @ self.up
        else:
            out = hidden_states @ self.delta
        if self.bias is not None:
            out = out + self.bias
        return out, None

    @torch.no_grad()
    def load_fit(self, fit: CompensationFit) -> None:
        """Copy a :func:`fit_compensation` result into the parameters."""
        if fit.rank != self.rank or (fit.bias is not None) != self.has_bias:
            raise ValueError("the fit's rank/bias do not match this module")
        if self.rank:
            self.down.copy_(fit.down.to(self.down.dtype))
            self.up.copy_(fit.up.to(self.up.dtype))
        else:
            self.delta.copy_(fit.delta.to(self.delta.dtype))
        if self.bias is not None:
            self.bias.copy_(fit.bias.to(self.bias.dtype))

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, rank={self.rank}, bias={self.has_bias}"


@dataclass
class CompensationFit:
    """A fitted ``W = I + D`` (``D = down @ up`` when ``rank > 0``) and bias, float32."""

    delta: Tensor
    bias: Tensor | None
    rank: int = 0
    down: Tensor | None = None
    up: Tensor | None = None

    @property
    def weight(self) -> Tensor:
        return torch.eye(self.delta.shape[0], dtype=self.delta.dtype) + self.delta

    def predict(self, inputs: Tensor) -> Tensor:
        """``inputs @ W + b``."""
        x = inputs.to(self.delta.dtype)
        out = x + x @ self.delta
        return out + self.bias if self.bias is not None else out


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
