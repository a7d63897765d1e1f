"""A ``dot_general`` for dense layers that computes on 2-D operands, so that its gradients are 2-D matmuls.

``DenseGeneral`` contracts the trailing axes of ``x`` (B, T, *in) with the leading axes of the kernel
(*in, *out). Autodiff of that 3-D ``dot_general`` gives the kernel gradient as a contraction of
(B, T, *in) with (B, T, *out) over B and T, which XLA:CPU runs as explicit transposes followed by a plain
dot. Flattening both operands first — x → (B·T, prod(in)), kernel → (prod(in), prod(out)) — computes the
same products, and autodiff of a 2-D matmul is two 2-D matmuls: dW = x2ᵀ·dy2, dx = dy2·W2ᵀ. On 2 CPU cores
a grad of 8 residual MLP blocks (B=16, T=64, D=128, float32) took 212–221 ms per call through the 3-D
dot and 127–137 ms through the 2-D one, with bit-identical gradients (and the same time as a
``jax.custom_vjp`` whose backward does the 2-D matmuls by hand). A plain reshape is used rather than a
custom VJP so that forward-mode autodiff (``jax.jacfwd`` through a flow) keeps working and remat
policies still see ordinary ``dot_general`` primitives.

Accelerators keep the 3-D form (``flow.block.uses_dense_2d``): there the reshape that merges batch and
sequence axes can force resharding, and XLA's own dot_general gradients are fast.
"""

from __future__ import annotations

import math

import jax
from jax import lax


def dot_general_2d(lhs: jax.Array, rhs: jax.Array, dimension_numbers, precision=None,
                   preferred_element_type=None) -> jax.Array:
    """``lax.dot_general`` for a dense layer, computed as one 2-D matmul; returns ``lhs.shape[:-n] +
    rhs.shape[n:]`` where ``n`` axes are contracted.

    Only the dense contraction is accepted: the trailing ``n`` axes of ``lhs`` with the leading ``n``
    axes of ``rhs``, in order, and no batch dimensions (``DenseGeneral`` with ``axis`` the last axes and
    no ``batch_dims``). Drop-in for ``DenseGeneral(dot_general=...)``.
    """
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    n = len(lhs_contract)
    trailing = tuple(range(lhs.ndim - n, lhs.ndim))
    if (lhs_batch or rhs_batch or n == 0 or tuple(lhs_contract) != trailing
            or tuple(rhs_contract) != tuple(range(n))):
        raise ValueError(f"dot_general_2d: dimension_numbers={dimension_numbers!r} for shapes {lhs.shape} x "
                         f"{rhs.shape}: expected the trailing lhs axes {trailing} contracted with the leading rhs "
                         f"axes {tuple(range(n))} and no batch dimensions")
    if lhs.shape[lhs.ndim - n:] != rhs.shape[:n]:
        raise ValueError(f"dot_general_2d: contracted lhs axes {lhs.shape[lhs.ndim - n:]} do not match the "
                         f"leading rhs axes {rhs.shape[:n]}")
    k = math.prod(rhs.shape[:n])
    m = math.prod(rhs.shape[n:])
    rows = lhs.shape[:lhs.ndim - n]
    out = lax.dot_general(lhs.reshape(math.prod(rows), k), rhs.reshape(k, m), (((1,), (0,)), ((), ())),
                          precision=precision, preferred_element_type=preferred_element_type)
    return out.reshape(rows + rhs.shape[n:])
