"""The repository's top-level ``integration/`` and ``csrc/`` as ``gft_kernels`` subpackages.

An install maps them (pyproject's ``package-dir``): ``integration/`` becomes
``gft_kernels.integration`` and ``csrc/`` the data package ``gft_kernels.csrc``. A plain
checkout on ``sys.path`` has no such mapping, so this finder gives the same two names the
same folders there. It answers only for those names, only when the folder sits beside
this package, and only after every other finder has declined (an install's mapping wins).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from pathlib import Path
from typing import Dict, Optional

_ROOT = Path(__file__).resolve().parent.parent
# Package name -> folder at the repository root, as pyproject's package-dir maps them.
_FOLDERS: Dict[str, str] = {
    "gft_kernels.integration": "integration",
    "gft_kernels.csrc": "csrc",
}


class _CheckoutFolders(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname, path=None, target=None
    ) -> Optional[importlib.machinery.ModuleSpec]:
        folder = _FOLDERS.get(fullname)
        if folder is None:
            return None
        where = _ROOT / folder
        init = where / "__init__.py"
        if init.is_file():
            return importlib.util.spec_from_file_location(
                fullname, init, submodule_search_locations=[str(where)]
            )
        if where.is_dir():  # a folder of data files (csrc): a namespace package, as installed
            spec = importlib.machinery.ModuleSpec(fullname, None, is_package=True)
            spec.submodule_search_locations = [str(where)]
            return spec
        return None


def install() -> None:
    """Append the finder once, behind every other (a no-op outside a checkout)."""
    if not (_ROOT / "pyproject.toml").is_file():
        return
    if not any(isinstance(finder, _CheckoutFolders) for finder in sys.meta_path):
        sys.meta_path.append(_CheckoutFolders())


def package_folder(name: str) -> Path:
    """The folder of package ``name`` (e.g. ``gft_kernels.csrc``), installed or checked out."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{name}: not installed and not in a checkout beside gft_kernels")
    return Path(next(iter(spec.submodule_search_locations)))
