"""The projection engine (private): every constraint family through one entry point.

Every constraint states rows of ``C u = d`` (:mod:`constraint_layers.rows`); the engine returns

    u~ = u - W C^T (C W C^T)^{-1} (C u - d)

(and the conditioned Gaussian for Gaussian outputs), choosing the solver by the rows' structure:

- ``dense``: the joint entry for grid outputs, few dense rows (``M x M`` Cholesky with the
  consistency check), boundary rows eliminated first (deterministic) or conditioned on jointly
  (Gaussian), and the dense float64 reference;
- ``streaming``: conditioning on conservation rows, one-row updates per frame when the rows are
  disjoint and the covariance diagonal;
- ``gaussian``: the general Gaussian conditioning kernel (ProbConserv's update, any covariance);
- ``dependence``: which rows follow from the others, judged at rounding;
- ``bounded``: box bounds on top of the equality rows (separable, face-eliminated, general
  active-set solvers, and the joint entry that chooses among them).

The face-local closed forms stay with their family (:mod:`constraint_layers.boundary.enforce`), as
do the local (stencil) solvers (:mod:`constraint_layers.local`) and the point-cloud rows
(:mod:`constraint_layers.pointcloud`).
"""
