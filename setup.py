"""Build the C data plane (native/) as a shared object inside the package.

The object is loaded with ctypes (ublkmig/native/), so it carries no Python
entry point; setuptools' Extension machinery is used only to compile and link
it as part of the package build.  liburing (2.x, static) and the ublk UAPI
header come from the build cache that ci/kernels fills (bookworm's are too
old); UBLKMIG_BUILD overrides its location.
"""

import os
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
BUILD = Path(os.environ.get("UBLKMIG_BUILD", HERE / ".cache" / "build"))


class BuildNative(build_ext):
    def get_export_symbols(self, ext):  # no PyInit_*: loaded with ctypes
        return []

    def run(self):
        if not (BUILD / "lib" / "liburing.a").exists():
            sys.exit(f"error: {BUILD}/lib/liburing.a is missing; run ci/setup (or ci/kernels sysroot) first")
        super().run()


# the data plane's layers, a folder each (native/tests are the native test programs)
sources = sorted(str(p.relative_to(HERE)) for p in (HERE / "native").glob("*/*.c")
                 if p.parent.name != "tests")
native = Extension(
    "ublkmig._native",
    sources=sources,
    include_dirs=[str(BUILD / "include"), "native"],
    extra_objects=[str(BUILD / "lib" / "liburing.a")],
    extra_compile_args=["-std=gnu11", "-O2", "-g", "-Wall", "-Wextra", "-Werror",
                        "-fvisibility=hidden", "-D_GNU_SOURCE"],
    extra_link_args=["-pthread", "-Wl,--exclude-libs,ALL"],  # export only ubm_*
    depends=[str(p.relative_to(HERE)) for p in (HERE / "native").glob("**/*.h")],
)

setup(ext_modules=[native], cmdclass={"build_ext": BuildNative})
