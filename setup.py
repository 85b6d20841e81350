"""Builds the Cython hot loops (engine/_fastpath.pyx).

VOTES_CYTHON_ANNOTATE=1 writes an HTML annotation beside the .pyx; VOTES_CYTHON_DEBUG=1
keeps bounds checks on, so a debug build is one variable away (msgspec/uvloop habit).
"""

import os

from Cython.Build import cythonize
from setuptools import Extension, setup

debug_build = os.environ.get("VOTES_CYTHON_DEBUG") == "1"
directives = {
    "language_level": "3",
    "boundscheck": debug_build,
    "wraparound": debug_build,
    "cdivision": True,
}
extensions = [
    Extension(
        "engine._fastpath",
        ["engine/_fastpath.pyx"],
        extra_compile_args=["-O2"] if not debug_build else ["-O0", "-g"],
        # The receipt loops hash with OpenSSL's SHA256_* (engine/_fastpath_crypto.pxi).
        libraries=["crypto"],
        define_macros=[("OPENSSL_SUPPRESS_DEPRECATED", None)],
    )
]
setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives=directives,
        annotate=os.environ.get("VOTES_CYTHON_ANNOTATE") == "1",
    )
)
