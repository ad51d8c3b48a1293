"""What iteration averaging buys, measured on real series across seeds (``make study``, docs/results.md).

Modules: ``data`` (real series shipped by registry packages, split into training data and rolling test
windows), ``grid`` (cells, budgets, cache keys), ``families`` (how an estimator family trains one cell; the MXNet
family uses ``iteravg.gluonts.Trainer`` and ``iteravg.mx``), ``torch_family`` (``gluonts.torch`` estimators trained
by Lightning with ``iteravg.lightning``), ``worker`` (runs a list of cells on one process or on every rank of an
``mpirun`` or ``torchrun`` job), ``runner`` (launches the workers for the cells not cached yet) and ``report`` (the
table, the plots and docs/results.md).
"""
