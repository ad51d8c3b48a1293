import os

# Deterministic, quiet, and never picking up a launcher's environment by accident in single-process tests.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MXNET_ENGINE_TYPE", "ThreadedEngine")
for key in ("ITERAVG_COMM", "HOROVOD_RANK", "HOROVOD_HOSTNAME", "HOROVOD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE",
            "PMIX_RANK", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
            "SLURM_PROCID", "SLURM_STEP_NUM_TASKS"):
    os.environ.pop(key, None)
