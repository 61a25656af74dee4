"""majortom-assets: Major TOM embedding expansions as a Dagster code location.

The library modules (grid, fragment, core, synthetic, geoparquet, models, engine, vectors) know
nothing of Dagster. The Dagster layer lives in ``majortom_assets.definitions`` / ``defs``.

``dagster asset materialize -m majortom_assets`` scans this package's namespace for a Definitions
object, so when Dagster is already loaded (the Dagster CLI, webserver or code server) the
definitions are exposed here too; plain library use never pays for importing Dagster.
"""

import sys

__version__ = "0.1.0"

if "dagster" in sys.modules:  # loaded by a Dagster process: expose the code location
    import majortom_assets.defs  # noqa: F401,I001  (the subpackage would otherwise shadow `defs` below)

    from majortom_assets.definitions import defs  # noqa: F401
