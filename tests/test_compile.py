"""Compiled low-rank factors equal the adapted weight computed the naive, dense way (float64 oracle)."""

from __future__ import annotations

import itertools

import pytest
import torch

from deft_runtime.adapter import AdapterKind, Decomposition
from deft_runtime.compile import compile_adapter, linear_weights, merge_into, merged_weights
from deft_runtime.errors import RankError
from deft_runtime.projectors import projector_matrix
from deft_runtime.testing import random_adapter

SHAPES = [(16, 16), (24, 10), (10, 24), (7, 33)]  # square and rectangular, both ways
RANKS = [1, 3]


def naive_projector(mode: Decomposition, P: torch.Tensor, H: torch.Tensor | None) -> torch.Tensor:
    """Π from each decomposition's definition, densely, in float64 (independent of projectors.py)."""
    P = P.double()
    if mode is Decomposition.PLAIN:
        return P @ P.T
    if mode is Decomposition.RELU:
        return P @ torch.relu(P).T
    if mode in (Decomposition.QR, Decomposition.SVD):  # orthogonal projector onto span(P)
        return P @ torch.linalg.inv(P.T @ P) @ P.T
    if mode in (Decomposition.TSVD, Decomposition.LRMF):  # U S Uᵀ = (P Pᵀ)^{1/2}
        evals, evecs = torch.linalg.eigh(P @ P.T)
        return evecs @ torch.diag(evals.clamp(min=0).sqrt()) @ evecs.T
    if mode is Decomposition.EIG:  # top-r eigenpairs of the rank-r matrix P Pᵀ rebuild it exactly
        evals, evecs = torch.linalg.eigh(P @ P.T)
        top = evals.argsort(descending=True)[: P.shape[1]]
        return evecs[:, top] @ torch.diag(evals[top]) @ evecs[:, top].T
    if mode is Decomposition.NMF:
        assert H is not None
        return torch.relu(P) @ torch.relu(H.double())
    raise AssertionError(mode)


def naive_injection_basis(mode: Decomposition, P: torch.Tensor) -> torch.Tensor:
    """Q multiplying R, from its definition (QR/SVD signs follow LAPACK, as in the trainer)."""
    if mode is Decomposition.QR:
        return torch.linalg.qr(P.double()).Q
    if mode is Decomposition.SVD:
        return torch.linalg.svd(P.double(), full_matrices=False).U
    if mode is Decomposition.NMF:
        return torch.relu(P.double())
    if mode is Decomposition.LRMF:
        U, S, _ = torch.linalg.svd(P.double(), full_matrices=False)
        return U * S.sqrt()
    if mode in (Decomposition.TSVD, Decomposition.EIG):
        return torch.linalg.svd(P.double(), full_matrices=False).U
    return P.double()


def naive_adapted_weight(adapter, name: str, W0: torch.Tensor) -> torch.Tensor:
    layer = adapter.layers[name]
    W0 = W0.double()
    if adapter.kind is AdapterKind.LORA:
        return W0 + layer.scale * layer.up.double() @ layer.down.double()
    Pi = naive_projector(adapter.decomposition, layer.P, layer.H)
    W = (torch.eye(W0.shape[0], dtype=torch.float64) - Pi) @ W0
    if adapter.kind is AdapterKind.DEFT:
        g = torch.sigmoid(layer.gate.double()) if layer.gate is not None else 1.0
        W = W + layer.scale * g * naive_injection_basis(adapter.decomposition, layer.P) @ layer.R.double()
    return W


CASES = [(AdapterKind.DEFT, m) for m in Decomposition] + [(AdapterKind.PARA, m) for m in Decomposition]
CASES += [(AdapterKind.LORA, None)]


@pytest.mark.parametrize(("kind", "mode"), CASES, ids=lambda v: getattr(v, "value", str(v)))
@pytest.mark.parametrize(("shape", "rank"), list(itertools.product(SHAPES, RANKS)), ids=str)
def test_compiled_factors_equal_naive_delta(kind, mode, shape, rank):
    g = torch.Generator().manual_seed(hash((shape, rank)) % 1000)
    W0 = torch.randn(*shape, generator=g)
    shapes = {"blk.to_q": shape}
    adapter = random_adapter(kind, shapes, rank=rank, decomposition=mode, scale=0.7, gated=True, seed=rank)
    compiled = compile_adapter(adapter, {"blk.to_q": W0})
    f = compiled.factors["blk.to_q"]
    assert tuple(f.B.shape) == (shape[0], rank) and tuple(f.A.shape) == (rank, shape[1])
    assert f.B.dtype == torch.float32 and f.A.dtype == torch.float32
    expected_delta = naive_adapted_weight(adapter, "blk.to_q", W0) - W0.double()
    assert expected_delta.abs().max() > 1e-3, "the adapter must actually change the weight"
    torch.testing.assert_close(f.delta().double(), expected_delta, atol=2e-5, rtol=1e-4)
    merged = merged_weights(compiled, {"blk.to_q": W0})["blk.to_q"]
    torch.testing.assert_close(
        merged.double(), naive_adapted_weight(adapter, "blk.to_q", W0), atol=2e-5, rtol=1e-4
    )


@pytest.mark.parametrize("mode", list(Decomposition), ids=lambda m: m.value)
def test_projector_matrix_matches_definition(mode):
    g = torch.Generator().manual_seed(3)
    P, H = torch.randn(12, 3, generator=g), torch.rand(3, 12, generator=g)
    torch.testing.assert_close(
        projector_matrix(mode, P, H if mode is Decomposition.NMF else None).double(),
        naive_projector(mode, P, H),
        atol=1e-5,
        rtol=1e-4,
    )


def test_orthogonal_modes_are_idempotent_projectors():
    P = torch.randn(20, 4, generator=torch.Generator().manual_seed(1))
    for mode in (Decomposition.QR, Decomposition.SVD):
        Pi = projector_matrix(mode, P)
        torch.testing.assert_close(Pi @ Pi, Pi, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", list(AdapterKind), ids=lambda k: k.value)
def test_rank_above_layer_size_is_rejected(kind):
    adapter = random_adapter(kind, {"proj": (6, 4)}, rank=5)
    with pytest.raises(RankError, match=r"rank 5 is impossible for a \[6 x 4\] weight \(at most 4\)"):
        compile_adapter(adapter, {"proj": torch.randn(6, 4)})


def test_rank_above_configured_maximum_is_rejected():
    adapter = random_adapter(AdapterKind.DEFT, {"proj": (16, 16)}, rank=8)
    with pytest.raises(RankError, match="rank 8 is above this server's maximum rank 4"):
        compile_adapter(adapter, {"proj": torch.randn(16, 16)}, max_rank=4)


def test_merge_into_module_changes_only_a_copy_and_matches_low_rank_forward():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 9), torch.nn.GELU(), torch.nn.Linear(9, 5))
    weights = linear_weights(model)
    adapter = random_adapter(AdapterKind.DEFT, {n: tuple(w.shape) for n, w in weights.items()}, rank=2)
    compiled = compile_adapter(adapter, weights)
    original = {n: w.detach().clone() for n, w in weights.items()}
    import copy

    merged = merge_into(copy.deepcopy(model), compiled)
    for n, w in linear_weights(model).items():
        assert torch.equal(w, original[n]), "merge_into must not touch the model it was not given"
    x = torch.randn(3, 12)
    h = torch.nn.functional.linear(x, original["0"], model[0].bias)
    h = h + x @ compiled.factors["0"].A.T @ compiled.factors["0"].B.T
    h = torch.nn.functional.gelu(h)
    y = torch.nn.functional.linear(h, original["2"], model[2].bias) + h @ (compiled.factors["2"].delta()).T
    torch.testing.assert_close(merged(x), y, atol=1e-5, rtol=1e-5)


def test_fingerprint_records_target_shapes():
    weights = {"a": torch.randn(8, 4), "b": torch.randn(4, 8), "unused": torch.randn(3, 3)}
    adapter = random_adapter(AdapterKind.LORA, {"a": (8, 4), "b": (4, 8)}, rank=2)
    compiled = compile_adapter(adapter, weights)
    assert dict(compiled.fingerprint.shapes) == {"a": (8, 4), "b": (4, 8)}
    assert compiled.nbytes == sum(4 * (8 * 2 + 2 * 4) for _ in range(2))


@pytest.mark.parametrize(
    ("kind", "mode"),
    [
        (AdapterKind.DEFT, Decomposition.PLAIN),
        (AdapterKind.DEFT, Decomposition.RELU),
        (AdapterKind.LORA, None),
    ],
)
def test_compiled_factors_never_alias_adapter_tensors(kind, mode):
    adapter = random_adapter(kind, {"p": (6, 5)}, rank=2, decomposition=mode)
    compiled = compile_adapter(adapter, {"p": torch.randn(6, 5)})
    before = compiled.factors["p"].delta().clone()
    for t in adapter.layers["p"].tensors().values():
        t.mul_(3.0)  # a trainer stepping its parameters in place
    assert torch.equal(compiled.factors["p"].delta(), before)
