"""Built-in plugins. Each is an ordinary plugin module, loaded through the same entry points
as third-party plugins; they import only `apifast` contract modules, never router internals."""
