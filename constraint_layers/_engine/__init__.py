"""The projection engine (private): every constraint family through one entry point.

Every constraint states rows of ``C u = d`` (:mod:`constraint_layers.rows`); the engine returns

    u~ = u - W C^T (C W C^T)^{-1} (C u - d)

(and the conditioned Gaussian for Gaussian outputs), choosing the solver by the rows' structure:

- ``dispatch``: the one entry; reads the structure tags and picks the solver;
- ``tags``: the tag vocabulary (``face``, ``frame``, ``dense``, ``local``, ``bounded``);
- ``rowops``: row operations (split by tag, stack, label, per-row noise, pull back through the
  face-local step);
- ``faces``: the face-local step (Dirichlet, Neumann, periodic rows in closed form, face by
  face; ``enforce_boundary``);
- ``dense``: few dense rows (``M x M`` Cholesky with the consistency check), with the face-local
  rows eliminated (deterministic) or conditioned on jointly (Gaussian);
- ``streaming``: conditioning on conservation rows, one-row updates per frame when the rows are
  disjoint and the covariance diagonal (``enforce_conservation``);
- ``gaussian``: the general Gaussian conditioning kernel (``condition_gaussian``, ProbConserv's
  update, any covariance);
- ``dependence``: which rows follow from the others, judged at rounding;
- ``bounded``: box bounds on top of the equality rows (separable, face-eliminated and general
  active-set solvers, and ``joint``, the bounded step that chooses among them);
- ``reference``: the dense float64 reference every solver is tested against.

The local (stencil) solvers stay with their family (:mod:`constraint_layers.local`), as do the
point-cloud rows (:mod:`constraint_layers.pointcloud`); the dispatcher calls them.
"""
