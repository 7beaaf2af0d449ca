"""The router: the client-facing /v1 API (inference through the request core, the key, the
models, usage and generations), holds and the usage-event publisher. It imports the core,
the catalog and the metering event; never `admin`, `orders` or a particular plugin."""

if __name__ != "apifast.router":
    raise ImportError("import this package as apifast.router")
