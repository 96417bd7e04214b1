"""Layer solvers: pure functions ``(W, H, spec) -> SolveResult``.

``W`` is (rows, cols) with one output channel per row; ``H = 2·XᵀX/n`` is (cols, cols). Every row
shares H and a layer's error is exactly the sum of its rows' errors (docs/solvers.md §1).
"""

from automl_compress.solvers.baselines import magnitude_prune, rtn_quantize
from automl_compress.solvers.exact_obs import exact_obs_prune
from automl_compress.solvers.gptq import gptq_quantize
from automl_compress.solvers.obc import obc_compress
from automl_compress.solvers.obq import obq_quantize
from automl_compress.solvers.quantizer import GridSpec, QuantGrid, fit_grid
from automl_compress.solvers.refine import fast_quantize
from automl_compress.solvers.result import SolveResult
from automl_compress.solvers.sparsegpt import sparsegpt_prune

__all__ = [
    "GridSpec",
    "QuantGrid",
    "SolveResult",
    "exact_obs_prune",
    "fast_quantize",
    "fit_grid",
    "gptq_quantize",
    "magnitude_prune",
    "obc_compress",
    "obq_quantize",
    "rtn_quantize",
    "sparsegpt_prune",
]
