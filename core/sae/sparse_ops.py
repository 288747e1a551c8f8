"""A TopK encoder whose backward pass only touches the latents each row kept.

A TopK SAE's code z = TopK(ReLU(W_enc (x - b_dec) + b_enc)) keeps m latents per row (m = k, or
k_aux for the AuxK loss), so the gradient of the loss with respect to the [N, n]
pre-activations has only N * m non-zero entries. Letting autograd differentiate the dense
pre-activations would nevertheless cost two more [N, d] x [d, n] matrix multiplies (the
gradients with respect to W_enc and to the input), a dense ReLU backward and [N, n] zero-filled
gradients, about as much as the rest of a training step. `encoder_acts_at` attaches the same
gradient (up to float rounding) using only the N * m (row, latent) pairs that were kept.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable


class _GatheredEncoder(torch.autograd.Function):
    """acts = ReLU((x - b_dec) @ weight.T + bias) at [N, m] indices, computed by the caller.

    The backward pass costs O(N m d + n d) instead of the O(N n d) of the dense one:
    - grad weight[i] = sum over the rows r that kept latent i of g[r, i] (x[r] - b_dec): one
      sparse [n, N] x [N, d] product with N * m non-zeros;
    - grad bias[i] = sum of those g[r, i]: an index_add;
    - grad b_dec = -(grad bias) @ weight, since every row's gradient with respect to x - b_dec is
      sum_j g[r, j] weight[indices[r, j]]; this is [n] x [n, d] work, far less than forming the
      [N, d] input gradient (which embedding_bag computes only when x itself needs a gradient).
    g is the incoming gradient, zeroed where the activation is <= 0 (the ReLU's derivative).
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        x: Tensor,
        weight: Tensor,
        bias: Tensor,
        b_dec: Tensor,
        indices: Tensor,
        acts: Tensor,
    ) -> Tensor:
        ctx.save_for_backward(x, weight, b_dec, indices, acts)
        return acts.clone()

    @staticmethod
    @once_differentiable
    def backward(
        ctx: FunctionCtx, grad_acts: Tensor
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None, None, None]:
        x, weight, b_dec, indices, acts = ctx.saved_tensors
        grad = grad_acts.masked_fill(acts <= 0, 0)
        grad_bias = grad.new_zeros(weight.shape[0]).index_add_(0, indices.flatten(), grad.flatten())
        grad_x = grad_weight = grad_b_dec = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(indices, weight, per_sample_weights=grad, mode="sum")
        if ctx.needs_input_grad[1]:
            grad_weight = _sparse_weight_grad(indices, grad, x - b_dec, weight.shape[0])
        if ctx.needs_input_grad[3]:
            grad_b_dec = -(grad_bias @ weight)
        return grad_x, grad_weight, grad_bias, grad_b_dec, None, None


def encoder_acts_at(
    x: Tensor, weight: Tensor, bias: Tensor, b_dec: Tensor, indices: Tensor, acts: Tensor
) -> Tensor:
    """`acts` with the gradient of ReLU((x - b_dec) @ weight.T + bias) gathered at `indices`.

    x [N, d], weight [n, d], bias [n] and b_dec [d] are the encoder's input and parameters;
    indices [N, m] are distinct latents per row and acts [N, m] their activations, computed by
    the caller without gradient (e.g. by a dense forward pass and topk). The result equals
    `acts`; its gradient with respect to x, weight, bias and b_dec is that of the dense
    expression, computed sparsely (see `_GatheredEncoder`). Activations <= 0 get no gradient.
    """
    return _GatheredEncoder.apply(x, weight, bias, b_dec, indices, acts)


def _sparse_weight_grad(
    indices: Tensor, grad: Tensor, x_centered: Tensor, num_latents: int
) -> Tensor:
    """[n, d]: row i is the sum of grad[r, j] * x_centered[r] over the (r, j) with indices i.

    Computed in at least float32: CPU sparse products have no float16 or bfloat16 kernels, and
    each row sums up to N terms.
    """
    dtype = torch.promote_types(x_centered.dtype, torch.float32)
    product = _latents_by_rows(indices, grad.to(dtype), num_latents) @ x_centered.to(dtype)
    return product.to(x_centered.dtype)


def _latents_by_rows(indices: Tensor, values: Tensor, num_latents: int) -> Tensor:
    """The [num_latents, N] sparse CSR matrix holding values[r, j] at (indices[r, j], r).

    Built as a CSC matrix, whose columns (the rows r) each hold m entries, then converted:
    CSR times dense is the sparse product best supported on CPU and CUDA alike.
    """
    indices, order = indices.sort(dim=1)  # CSC wants sorted row indices within each column
    num_rows, m = indices.shape
    ccol = torch.arange(num_rows + 1, device=indices.device) * m
    with warnings.catch_warnings():  # torch calls compressed layouts "beta", once per process
        warnings.filterwarnings("ignore", "Sparse CS[RC] tensor support is in beta state")
        csc = torch.sparse_csc_tensor(
            ccol,
            indices.flatten(),
            values.gather(1, order).flatten(),
            (num_latents, num_rows),
            check_invariants=False,
        )
        return csc.to_sparse_csr()
