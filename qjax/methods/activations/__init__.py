"""Activation-side methods: per-token activation quantizers (``quantizers``), SmoothQuant's function-preserving
migration of activation outliers into the weights (``smoothquant``) and planted synthetic outlier channels
(``outliers``)."""
