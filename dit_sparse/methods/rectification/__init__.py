"""Pooled rectification (Rectified SpaAttn) in parts; :mod:`dit_sparse.methods.pooled_rectification` is its face.

* :mod:`.config`: :class:`~.config.PooledRectificationConfig`, the combine modes and row keys, the shared argument
  checks;
* :mod:`.statistics`: pooled block statistics, IPAR probabilities, GAPR reliability, the outlier count of a config
  and the per-call statistics (:class:`~.statistics.CallStatistics`);
* :mod:`.selection`: critical-block selection (top-p with a top-k floor, neighbours, first frame) and the final
  mask of a call;
* :mod:`.block_combine`: ``combine="block"``: the ``(R, c)`` epilogue and the rectified plan;
* :mod:`.row_combine`: ``combine="row"``: the pooled key segment read in each row's softmax, and the two-pass
  remainder and LSE merge.

Imports go one way: config <- statistics <- selection <- block_combine; statistics <- row_combine.
"""
