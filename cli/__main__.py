"""`python -m apifast.cli`: the `apifast` command."""

from apifast.cli.main import main

raise SystemExit(main())
