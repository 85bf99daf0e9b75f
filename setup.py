"""Only the mote engine's C kernels are built here; everything else is in pyproject.toml.

The library is one shared object with every ISA path compiled in (no -march: the paths carry their own
target attributes and are chosen at run time, runtime_cpu/csrc/mote_kernels.h). It is loaded with ctypes,
not imported, so it uses no Python C API. `optional`: without a C compiler the install still succeeds and
the mote engine runs its numpy kernels, saying so."""
from glob import glob

from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "mote_edge.runtime_cpu._mote_kernels",
    sources=sorted(glob("runtime_cpu/csrc/*.c")),
    depends=sorted(glob("runtime_cpu/csrc/*.h")),
    extra_compile_args=["-O3", "-std=gnu11", "-fno-strict-aliasing", "-Wall"],
    extra_link_args=["-pthread"],
    optional=True,
)])
