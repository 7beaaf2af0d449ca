"""The admin panel (/admin) and the key holder's dashboard (/dashboard).

Server-rendered pages (Jinja2) with every asset served from this package (/assets): no CDN
and no third-party request. The panel signs in with one password (`apifast admin
set-password`) into a server-side session carried by a single Secure, HttpOnly,
SameSite=Strict cookie; every state-changing form carries a CSRF token, and every action is
written to the audit table. `apifast.admin.mount.install_admin` adds the routes; the
composition root keeps an `AdminState` (`state.py`) at `app.state.admin`.

May import the core (`apifast.*` modules) and `apifast.catalog`; never the router or another
feature.
"""

if __name__ != "apifast.admin":
    raise ImportError("import this package as apifast.admin")
