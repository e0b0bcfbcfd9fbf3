"""Tests, in folders that mirror the package's (model/, io/, runtime/, serve/, tools/); those of the whole (the README,
the notebooks, the scripts, the bundled model) at the top."""
