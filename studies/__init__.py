"""Studies: longer measurements than the tests, each behind its own Makefile target (``make study``)."""
