"""Projector decompositions: from trainable ``P`` (and ``H``) to ``(Q, right)`` with ``Π = Q·rightᵀ``.

Every adapter of kind deft or para removes the subspace ``Π·W0`` from a frozen weight; deft also
injects ``s·Q·R``. All math here runs in float32 (QR, SVD and eigendecompositions are unreliable in
half precision) and is differentiable, so the trainer calls the same functions on its parameters.

=========  ==============================  =====================  ================================
mode       Q  [d_out, r]                   right  [d_out, r]      projector Π = Q·rightᵀ
=========  ==============================  =====================  ================================
plain      P                               P                      P·Pᵀ (reference SDXL code; not
                                                                  orthonormal)
relu       P                               relu(P)                P·relu(P)ᵀ (PEFT DEFT default)
qr         Q of QR(P)                      Q                      Q·Qᵀ (orthogonal, paper)
svd        U[:, :r] of SVD(P)              Q                      U·Uᵀ (same span as qr)
tsvd       U[:, :r]                        U·diag(S)              U·S·Uᵀ (truncated SVD of P)
lrmf       U·diag(√S)                      U·diag(√S)             (U√S)(U√S)ᵀ = U·S·Uᵀ
nmf        relu(P)                         relu(H)ᵀ               relu(P)·relu(H), H: [r, d_out]
eig        V (top-r eigvecs of P·Pᵀ)       V·diag(λ)              V·Λ·Vᵀ, λ = top-r eigvals of P·Pᵀ
=========  ==============================  =====================  ================================

Notes on fidelity to the reference code:

- ``eig``: the top-r eigenpairs of ``P·Pᵀ`` are ``(u_i, σ_i²)`` from the thin SVD of ``P``; computing
  them that way costs O(d_out·r²) instead of O(d_out³) and has the same value and span.
- ``nmf``: the reference layer multiplies row vectors by its projector (``x·W0ᵀ·Π``), which applies
  ``Πᵀ`` to the output. Here every projector acts on the output as ``Π·W0`` (column convention), so
  a reference ``(W, H)`` pair corresponds to ``(P, H) = (Hᵀ, Wᵀ)``. Symmetric projectors are unaffected.
"""

from __future__ import annotations

import torch

from deft_runtime.adapter import Decomposition
from deft_runtime.errors import AdapterShapeError


def project(
    decomposition: Decomposition, P: torch.Tensor, H: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(Q, right)``, both float32 ``[d_out, r]``, such that ``Π = Q·rightᵀ``.

    Pseudo-code (shapes: ``P [d_out, r]``, ``H [r, d_out]``)::

        P = float32(P)
        Q, right = TABLE[decomposition](P, H)      # see the module docstring
        return Q, right
    """
    P = P.to(torch.float32)
    if decomposition is Decomposition.PLAIN:
        return P, P
    if decomposition is Decomposition.RELU:
        return P, torch.relu(P)
    if decomposition is Decomposition.QR:
        Q = torch.linalg.qr(P, mode="reduced").Q
        return Q, Q
    if decomposition is Decomposition.NMF:
        if H is None or tuple(H.shape) != (P.shape[1], P.shape[0]):
            found = None if H is None else tuple(H.shape)
            raise AdapterShapeError(f"nmf needs H of shape {(P.shape[1], P.shape[0])}, found {found}")
        return torch.relu(P), torch.relu(H.to(torch.float32)).T
    U, S, _ = torch.linalg.svd(P, full_matrices=False)
    if decomposition is Decomposition.SVD:
        return U, U
    if decomposition is Decomposition.TSVD:
        return U, U * S
    if decomposition is Decomposition.LRMF:
        US = U * S.sqrt()
        return US, US
    if decomposition is Decomposition.EIG:
        return U, U * S.square()
    raise AssertionError(f"unhandled decomposition {decomposition}")


def projector_matrix(
    decomposition: Decomposition, P: torch.Tensor, H: torch.Tensor | None = None
) -> torch.Tensor:
    """The dense ``[d_out, d_out]`` projector ``Π`` (for tests and inspection; never on a hot path)."""
    Q, right = project(decomposition, P, H)
    return Q @ right.T
