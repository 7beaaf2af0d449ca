"""ApiFast core: settings, the plugin contract, money and keys, errors, metrics, tracing and
the database layer. The command line is `cli/` (installed as `apifast.cli`), a feature.

Everything here is shared by `router/`, `metering/`, `admin/`, `orders/` and the plugins, and
imports none of them. Plugin authors
import only `apifast.hookimpl` and the contract modules `apifast.providers` / `apifast.payments`.
"""

import pluggy

hookimpl = pluggy.HookimplMarker("apifast")

__all__ = ["hookimpl"]
__version__ = "0.1.0"
