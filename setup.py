"""Only here for the optional C fold kernel; all metadata lives in pyproject.toml.

The kernel is loaded with ctypes. If it cannot be compiled, iteravg falls back to numpy (slower, same results).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "iteravg.core._foldkernel",
            ["src/iteravg/core/_foldkernel.c"],
            extra_compile_args=["-O3", "-std=c99", "-ffp-contract=off", "-fno-fast-math", "-fno-strict-aliasing"],
            optional=True,
        ),
        Extension(  # oneDNN: all parameters back to the default layout in one call (see the file's header)
            "iteravg.mx._ndkernel",
            ["src/iteravg/mx/_ndkernel.c"],
            extra_compile_args=["-O2", "-std=c99"],
            optional=True,
        ),
    ]
)
