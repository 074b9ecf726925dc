"""align's built-in stage plugins. Each module is an ordinary plugin, listed under the ``align``
entry-point group in pyproject.toml exactly as a third party's would be."""
