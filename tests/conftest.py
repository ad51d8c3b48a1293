import os

# Deterministic, quiet, and never picking up a launcher's environment by accident in single-process tests.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MXNET_ENGINE_TYPE", "ThreadedEngine")
for key in ("ITERAVG_COMM", "HOROVOD_RANK", "HOROVOD_HOSTNAME", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"):
    os.environ.pop(key, None)
