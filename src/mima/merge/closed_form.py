"""Closed-form Merge layer of MIMA (multi-concept model immunization), as pure tensor math.

Reference: Zheng & Yeh, "Multi-concept Model Immunization through Differentiable Model Merging", AAAI 2025
(arXiv 2412.15320), closed-form merge of cross-attention key/value projections (Sec. 3, merge equation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Relative jitter added to the (m, m) system C M^-1 C^T, scaled by its mean diagonal.
_SYSTEM_JITTER = 1e-10


@dataclass(frozen=True)
class FactorizedGram:
    """Cholesky factor of M + ridge*I, M = C_reg^T C_reg, computed once (float64).

    Args:
        cholesky (`torch.Tensor`): (d, d) lower-triangular float64 factor L with L L^T = M + ridge*I.
        ridge (`float`): the absolute ridge added to the Gram diagonal.
    """

    cholesky: torch.Tensor  # (d, d)
    ridge: float

    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        """Returns (M + ridge*I)^-1 rhs in float64 for rhs of shape (d, k)."""
        return torch.cholesky_solve(rhs.to(torch.float64), self.cholesky)


def factorize_gram(reg_bank: torch.Tensor, ridge: float = 1e-3) -> FactorizedGram:
    """Factorizes the regularisation Gram M + ridge*I with M = C_reg^T C_reg.

    Args:
        reg_bank (`torch.Tensor`): C_reg of shape (s, d), generic caption token embeddings (rows).
        ridge (`float`, *optional*, defaults to 1e-3): absolute (not scale-relative) ridge > 0; it keeps M
            invertible when s < d or C_reg is rank-deficient and pulls W toward W_0 in unconstrained directions.

    Returns:
        `FactorizedGram`: the float64 Cholesky factor, reusable across layers sharing the same bank.
    """
    if not ridge > 0:
        raise ValueError(f"ridge must be > 0, got {ridge}")
    if reg_bank.dim() != 2:
        raise ValueError(f"reg_bank must be 2-D (s, d), got shape {tuple(reg_bank.shape)}")
    c_reg = reg_bank.to(torch.float64)  # (s, d)
    gram = c_reg.T @ c_reg + ridge * torch.eye(c_reg.shape[1], dtype=torch.float64, device=c_reg.device)  # (d, d)
    chol, info = torch.linalg.cholesky_ex(gram)
    if info.item() != 0:
        raise ValueError(f"M + ridge*I is not positive definite (ridge={ridge} too small for the bank's scale)")
    return FactorizedGram(cholesky=chol, ridge=float(ridge))


def closed_form_merge(
    w0: torch.Tensor,
    targets: torch.Tensor,
    values: torch.Tensor,
    reg_bank: torch.Tensor | FactorizedGram,
    ridge: float = 1e-3,
) -> torch.Tensor:
    """Merges target key/value pairs into a projection W in closed form.

    Solves argmin_W ||(W - W_0) C_reg^T||_F^2 + ridge ||W - W_0||_F^2  s.t.  W C^T = V^T.

    Args:
        w0 (`torch.Tensor`): W_0 of shape (d_out, d), the current pre-adaptation weight.
        targets (`torch.Tensor`): C of shape (m, d), target token embeddings (rows).
        values (`torch.Tensor`): V of shape (m, d_out), desired outputs; row i is the value for row i of C.
        reg_bank (`torch.Tensor` or `FactorizedGram`): C_reg of shape (s, d), or its precomputed factorization.
        ridge (`float`, *optional*, defaults to 1e-3): absolute ridge > 0; ignored when reg_bank is a `FactorizedGram`.

    Returns:
        `torch.Tensor`: W_hat of shape (d_out, d) in `w0.dtype`, differentiable w.r.t. w0, targets and values.
    """
    if w0.dim() != 2 or targets.dim() != 2 or values.dim() != 2:
        raise ValueError(
            f"expected 2-D w0 (d_out, d), targets (m, d), values (m, d_out); got w0 {tuple(w0.shape)}, "
            f"targets {tuple(targets.shape)}, values {tuple(values.shape)}"
        )
    d_out, d = w0.shape
    m = targets.shape[0]
    if targets.shape[1] != d or values.shape != (m, d_out):
        raise ValueError(
            f"shape mismatch: w0 {tuple(w0.shape)} (d_out, d), targets {tuple(targets.shape)} (m, d), "
            f"values {tuple(values.shape)} (m, d_out)"
        )
    gram = reg_bank if isinstance(reg_bank, FactorizedGram) else factorize_gram(reg_bank, ridge)
    if gram.cholesky.shape != (d, d):
        raise ValueError(f"reg_bank feature dim {tuple(gram.cholesky.shape)} does not match w0 {tuple(w0.shape)}")
    if m == 0:  # no constraints: the minimiser is W_0 itself
        return w0.clone()

    return apply_merge(w0, targets, values, merge_solution(targets, gram))


def merge_solution(targets: torch.Tensor, gram: FactorizedGram) -> torch.Tensor:
    """X = (C M^-1 C^T)^-1 C M^-1, the part of the merge that depends only on the targets C and M.

    Args:
        targets (`torch.Tensor`): C of shape (m, d), target token embeddings (rows), m >= 1.
        gram (`FactorizedGram`): the factorised M + ridge*I.

    Returns:
        `torch.Tensor`: X of shape (m, d) in float64 (differentiable w.r.t. targets), reusable for every layer
        and every step that merges onto the same targets.
    """
    c = targets.to(torch.float64)  # (m, d)
    a = gram.solve(c.T)  # M^-1 C^T, (d, m)
    system = c @ a  # C M^-1 C^T, (m, m), symmetric PSD
    # Singular system (duplicate/collinear targets): add a tiny relative jitter so Cholesky succeeds; consistent
    # duplicated constraints are then still met to ~jitter precision, and the map stays smooth for autograd.
    eye = torch.eye(c.shape[0], dtype=torch.float64, device=system.device)
    system = 0.5 * (system + system.T) + _SYSTEM_JITTER * system.diagonal().mean() * eye
    return torch.cholesky_solve(a.T, torch.linalg.cholesky(system))  # (m, d)


def apply_merge(w0: torch.Tensor, targets: torch.Tensor, values: torch.Tensor, solution: torch.Tensor) -> torch.Tensor:
    """W_hat = W_0 + (V^T - W_0 C^T) X for X = `merge_solution(targets, gram)`, in `w0.dtype` (linear in V)."""
    w0_64 = w0.to(torch.float64)  # (d_out, d)
    residual = values.to(torch.float64).T - w0_64 @ targets.to(torch.float64).T  # V^T - W_0 C^T, (d_out, m)
    # MIMA closed-form merge (Zheng & Yeh, AAAI 2025, arXiv 2412.15320):
    # W_hat = W_0 + (V^T - W_0 C^T) (C M^-1 C^T)^-1 C M^-1,  M = C_reg^T C_reg (+ ridge*I)
    return (w0_64 + residual @ solution.to(w0_64.device)).to(w0.dtype)  # (d_out, d)


def merged_values(
    adapted_weights: list[torch.Tensor], targets_per_concept: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacks the merge constraints of several concepts: V_n = C_n W_n^T.

    Args:
        adapted_weights (`list[torch.Tensor]`): per-concept adapted weights W_n, each (d_out, d).
        targets_per_concept (`list[torch.Tensor]`): per-concept target embeddings C_n, each (m_n, d).

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: C = cat(C_n) of shape (m, d) and V = cat(C_n W_n^T) of shape
        (m, d_out), differentiable w.r.t. each W_n.
    """
    if len(adapted_weights) != len(targets_per_concept) or not adapted_weights:
        raise ValueError(
            f"need one target tensor per adapted weight (non-empty); got {len(adapted_weights)} weights and "
            f"{len(targets_per_concept)} target tensors"
        )
    for w_n, c_n in zip(adapted_weights, targets_per_concept, strict=True):
        if w_n.dim() != 2 or c_n.dim() != 2 or w_n.shape[1] != c_n.shape[1] or w_n.shape != adapted_weights[0].shape:
            raise ValueError(
                f"expected W_n (d_out, d) with common shape {tuple(adapted_weights[0].shape)} and C_n (m_n, d); "
                f"got W_n {tuple(w_n.shape)}, C_n {tuple(c_n.shape)}"
            )
    c = torch.cat(targets_per_concept, dim=0)  # (m, d)
    v = torch.cat([c_n @ w_n.T for w_n, c_n in zip(adapted_weights, targets_per_concept, strict=True)], dim=0)
    return c, v  # (m, d), (m, d_out)
