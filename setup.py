"""The one compiled part: vfork + exec for job processes (see trio_worker/_host/_cspawn.c).

Everything else about the package is in pyproject.toml.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "trio_worker._host._cspawn",
            sources=["trio_worker/_host/_cspawn.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
        )
    ]
)
