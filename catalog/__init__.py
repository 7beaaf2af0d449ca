"""The model catalog: the TOML file, prices, and the live overlay managed in /admin. Shared by
the router (which serves it) and the admin panel (which edits it); imports only the core."""

if __name__ != "apifast.catalog":
    raise ImportError("import this package as apifast.catalog")
