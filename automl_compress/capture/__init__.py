"""Collect the layer Hessians ``H = 2·XᵀX/n`` of a model's compressible layers (docs/solvers.md §1).

Forward hooks on every selected ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d`` see the layer inputs
of each calibration batch; ``X`` stacks a layer's n input vectors as rows (Linear: every leading
dimension flattened; Conv: the im2col patches, one H per group of a grouped conv). Moments are
accumulated in float64 as running means merged batch by batch, so memory is bounded by the
Hessians and one chunk of unfolded inputs. From them: ``H = 2·XᵀX/n`` by default, or the centred
``H_c = 2·(X−μ)ᵀ(X−μ)/n`` when ``centered=True``; the input mean μ is always stored, for bias
folding (:func:`bias_correction`). Layers wider than ``max_dense_cols`` columns get a
block-diagonal H over consecutive column blocks of ``block_cols`` (cross-block correlations are
dropped; the per-row error of the layer is the sum of the per-block errors, see
:meth:`LayerHessian.iter_blocks`). Dead inputs and damping are not applied here:
:func:`automl_compress.solvers.hessian.prepare_hessian` does that in one shared place.

The package, bottom to top (each module imports only those before it, and :mod:`specs
<automl_compress.specs>` below them all):

- :mod:`~automl_compress.capture.hessian`: :class:`LayerHessian` and :func:`bias_correction`.
- :mod:`~automl_compress.capture.select`: :func:`select_layers`, :class:`UnsupportedLayer`.
- :mod:`~automl_compress.capture.moments`: input vectors of a layer call, streaming moments, the
  final H of a layer.
- :mod:`~automl_compress.capture.finite`: :func:`check_finite_weights`,
  :func:`locate_non_finite`.
- :mod:`~automl_compress.capture.forward`: :func:`capture_hessians` (hooks, the calibration run).
"""

from automl_compress.capture.finite import check_finite_weights, locate_non_finite
from automl_compress.capture.forward import capture_hessians
from automl_compress.capture.hessian import LayerHessian, bias_correction
from automl_compress.capture.select import SUPPORTED, UnsupportedLayer, select_layers

__all__ = [
    "SUPPORTED",
    "LayerHessian",
    "UnsupportedLayer",
    "bias_correction",
    "capture_hessians",
    "check_finite_weights",
    "locate_non_finite",
    "select_layers",
]
