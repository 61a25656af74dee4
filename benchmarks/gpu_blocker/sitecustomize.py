"""Make packages the GPU machine lacks unimportable, to rehearse the GPU check on this machine.

Put this folder first on PYTHONPATH; Python imports ``sitecustomize`` at start-up. The packages
named (comma-separated) in ``MAJORTOM_BLOCK_IMPORTS`` -- by default everything the GPU machine
does not have and the check does not carry -- then raise ``ModuleNotFoundError`` exactly as
they would there, so a stray top-level import fails the rehearsal instead of the GPU run.
"""

from __future__ import annotations

import importlib.abc
import os
import sys

GPU_MACHINE_LACKS = "dagster,duckdb,faiss,geopandas,torchgeo,rasterio,imagecodecs,fiona,pyogrio"


class _Blocker(importlib.abc.MetaPathFinder):
    def __init__(self, names: set[str]) -> None:
        self.names = names

    def find_spec(self, fullname, path=None, target=None):
        if fullname.partition(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {fullname!r} (blocked: the GPU machine lacks it)",
                                      name=fullname)


_names = {n.strip() for n in os.environ.get("MAJORTOM_BLOCK_IMPORTS", GPU_MACHINE_LACKS).split(",") if n.strip()}
sys.meta_path.insert(0, _Blocker(_names))
