"""The live process table: the supervisor publishes it (`table.py`), an http worker serves it
(`GET /v1/system/processes`, `routes.py`), and the console's overview shows it."""
