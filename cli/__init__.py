"""The `apifast` command line: one module per command group."""

if __name__ != "apifast.cli":
    raise ImportError("import this package as apifast.cli")
