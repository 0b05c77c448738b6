"""Measurements of a finished run through the neural tangent kernel of its tuned parameters (`ntkcl diagnose`).

`kernels`: the empirical NTK (torch.func) and its summaries; `retrieval`: the PROTEUS retrieval bound;
`run`: the probe set, the per-task loop and `diagnostics.json`.
"""

from ntkcl.diagnostics.run import DIAGNOSTICS_FILE, diagnose_run

__all__ = ["DIAGNOSTICS_FILE", "diagnose_run"]
