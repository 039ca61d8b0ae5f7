"""Kernel refinement of shift-invariant affine layers (private; used by ``mode="refine"``).

BOON (Saad et al., ICLR 2023) refines every Fourier layer ``A(v) = K v + c`` of a neural operator
so that the layer's boundary rows obey the boundary condition's structure:

Dirichlet and Neumann axes (elimination). ``K -> T1 K T2``, where ``T2`` (column operations: an
update of the boundary inputs) removes the coupling of the boundary rows to the interior and
``T1`` (row operations) writes the boundary rows. With ``L(v) = A(v) - A(0)`` and ``K_BB`` the
block of ``L`` from the boundary nodes to themselves::

    T2:  v'_B = v_B + K_BB^+ (v_B - (L v)_B),  v'_I = v_I      (then (L v')_B = v_B if exact)
    T1:  A~(v)_B = v_B + A(0)_B,               A~(v)_I = A(v')_I

so the refined layer passes its boundary values through (plus its bias) whatever the interior
holds, and its interior outputs see the boundary update ``L(E_B delta)``. Neumann uses the same
elimination on both faces (the paper's 1D code eliminates the right face only, its 2D code
both), without its stencil rows and global factor 1/2: the output step makes the flux exact.

Periodic axes (the paper's periodic kernel correction, ``K -> T K``): the layer's two end rows
become their average, ``A~(v)_low = A~(v)_high = (A(v)_low + A(v)_high) / 2``; no elimination.

Several conditions: the eliminations of all Dirichlet/Neumann axes are computed from the same
residual (a block-Jacobi step over the axes), then the rows are written in the order the
conditions were given, so where two meet the later one holds, as in the output step. The
block-Jacobi step does not decouple the faces of different axes from each other (a joint T2 over
the whole boundary frame would, at a dense solve per layer and step); measured against the joint
T2 in ``examples/boundary_paper/refine_rcond.py`` and ``refine_joint.py``
(``examples/boundary_paper/RESULTS.md``, "Joint T2 vs block Jacobi"), which did not train
better. T1 keeps every layer's boundary rows independent of the interior either way.

How it is computed. The layer is a circular convolution on its (padded) grid, so everything
follows from its symbol ``H`` at the few frequencies where it responds
(:mod:`constraint_layers.boundary.spectral`):

- ``K_BB`` is block diagonal in the tangential Fourier basis: one ``(S C) x (S C)`` matrix per
  tangential frequency of the symbol (``S`` = number of constrained sides), Cholesky-factorised
  in float64;
- the residual ``v_B - (L v)_B`` needs the layer's output on the faces only: from the box of
  ``rfftn(v)`` and ``H``, a few small products;
- a layer that IS its description (``SpectralKernel.exact``: neuraloperator's own
  ``SpectralConv.forward`` in full precision) is evaluated from it in one pass: ``X`` = the
  spectrum of ``v`` on the box, ``y = H X``, the residual and ``delta`` per axis as above, then
  ``H (X + Delta)`` with ``Delta`` the box spectrum of the face update ``E_B delta`` and one
  inverse transform on the kept columns. Outputs and gradients equal the two-hook path below to
  rounding (``tests/boundary/test_refine_fused.py``);
- any other layer (``add_refinement`` without a description, a subclass with its own forward),
  ``refresh`` > 1 (a frozen block) and ``kernel_grad="detached"`` while training: T2 is applied
  to the layer's INPUT by a forward pre-hook (``v' = v + E_B delta``), so the layer computes
  ``A(v') = A(v) + L(E_B delta)`` in its own one evaluation, with its current weights.

The forward hook writes the rows (T1) in both cases. No second evaluation of the layer.

The symbol comes in closed form from the weights when the adapter describes the layer
(``spectrum=``, a :class:`~constraint_layers.boundary.spectral.SpectralKernel`: neuraloperator's
``SpectralConv``, dense or factorised, any number of axes, with domain padding): no probing, and
gradients are exact at every training step: they follow how ``K_BB^+`` depends on the weights
(freezing it, ``kernel_grad="detached"``, gives approximate gradients and trained worse:
``examples/boundary_paper/RESULTS.md``, "The refinement's gradients"). Without a description
(``add_refinement`` on another shift-invariant layer) the symbol is read from one batched
evaluation of the layer on ``C`` impulses and a zero input, inside the autograd graph while
gradients are recorded.

Ill-conditioned ``K_BB`` (the rule: a smooth kernel sees the two end nodes of a periodic grid
almost alike): ``K_BB^+ = (K^H K + lam^2 I)^{-1} K^H`` with ``lam = rcond`` times the largest
Frobenius norm of the per-frequency blocks (``rcond=0``: the pseudo-inverse). Directions far
above ``lam`` are inverted to rounding, those near or below it are damped instead of blowing up;
``T1`` keeps the boundary rows exact either way. The default ``rcond=1e-2`` was chosen by trained
accuracy (``examples/boundary_paper/RESULTS.md``, "rcond"); closer to exact elimination is not
better trained (exact elimination amplifies the boundary update, and training through that
amplification fails).

State, caching, precision: :mod:`~constraint_layers.boundary.refine.state`. Constants of the
grid (the box's DFT matrices and phases, index tensors) are cached per (grid, box, dtype,
device) and never depend on the weights. ``torch.jit.trace`` is refused: the refinement depends
on the grid in ways a trace cannot record. Under ``torch.autocast`` (bfloat16 / float16 inputs)
the refinement runs with autocast off in float32, as a stock ``SpectralConv`` runs its FFTs; the
refined layer returns float32, as the stock one does, and the model's next layers run under
autocast again. Activation checkpointing of a refined layer is not supported (its recomputation
runs outside the wrapper's call). neuraloperator's ``SpectralConv`` is not shift invariant on
grids with an odd size along an axis other than the last (it applies ``fftshift`` twice); the
adapter refuses those.

Modules:

- :mod:`~constraint_layers.boundary.refine.state`: :class:`RefinementContext` (the per-call
  state), :class:`Refinement` (one layer's hook object, its prepared factorisation, caches and
  diagnostics);
- :mod:`~constraint_layers.boundary.refine.hooks`: the forward pre-hook (T2), the forward hook
  (T1) and the one-pass ``forward`` that replaces a described layer's while attached;
- :mod:`~constraint_layers.boundary.refine.algebra`: the spectral algebra (probing a symbol,
  the factorised ``K_BB^+``, the per-axis T2 update, the one-pass refined layer);
- :mod:`~constraint_layers.boundary.refine.autograd`: the refinement's autograd functions
  (the regularised solve, the sampled box transform, the writes of T1).
"""

# private names that tests reach through the package (explicit re-exports: the same objects)
from .algebra import _index as _index
from .hooks import _FusedForward as _FusedForward
from .state import KERNEL_GRADS, Refinement, RefinementContext

__all__ = ["KERNEL_GRADS", "Refinement", "RefinementContext"]
