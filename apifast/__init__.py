"""ApiFast core: settings, the plugin contract, money and keys, the database layer and the CLI.

Everything here is shared by `router/`, `metering/`, `admin/` and the plugins. Plugin authors
import only `apifast.hookimpl` and the contract modules `apifast.providers` / `apifast.payments`.
"""

import pluggy

hookimpl = pluggy.HookimplMarker("apifast")

__all__ = ["hookimpl"]
__version__ = "0.1.0"
