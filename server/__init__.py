"""The composition root: the one place that knows every feature. It wires the router, the
admin panel, payments, the meter and the background services for `serve` and `dev`."""

if __name__ != "apifast.server":
    raise ImportError("import this package as apifast.server")
