"""Build the native CPU kernel ahead of time: ``python -m gft_kernels.backends.build``.

Compiles ``csrc/cpu_rows.cpp`` into torch's extension cache (or ``$GFT_KERNELS_BUILD_DIR``)
so the first ``backend="cpu"``/``"auto"`` call does not pay the ~30 s compile. Prints where
the module is and how long the build took; exits with status 1 and the error if it fails.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gft_kernels.backends.build", description=__doc__
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show the compiler output")
    args = parser.parse_args(argv)

    from gft_kernels.backends import cpu_rows

    start = time.perf_counter()
    try:
        module = cpu_rows.load(verbose=args.verbose)
    except RuntimeError as err:
        print(f"gft_kernels: building the native CPU kernel failed:\n{err}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - start
    print(f"gft_kernels: native CPU kernel ready: {module.__file__}")
    print(f"  source: {cpu_rows.source_path()}")
    print(f"  build/load time: {elapsed:.1f} s (a cached build only loads)")
    print(f"  inner loops: {module.simd_path()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
