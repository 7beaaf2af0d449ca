"""Built-in plugins. Each is an ordinary plugin module, loaded through the same entry points
as third-party plugins; they import only `apifast` contract modules, never router internals."""

if __name__ != "apifast.plugins":
    raise ImportError("import this package as apifast.plugins")
