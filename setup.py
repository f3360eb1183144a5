"""The compiled parts: vfork + exec for job processes (trio_worker/_host/_cspawn.c), and a
job's place made with the GIL released (trio_worker/_host/_cplace.c).

Everything else about the package is in pyproject.toml.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "trio_worker._host._cspawn",
            sources=["trio_worker/_host/_cspawn.c"],
            depends=["trio_worker/_host/_cseed.h"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
        ),
        Extension(
            "trio_worker._host._cplace",
            sources=["trio_worker/_host/_cplace.c"],
            depends=["trio_worker/_host/_cseed.h"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
        ),
    ]
)
