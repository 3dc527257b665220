"""The `evo` command line and the Python client it is a thin layer over."""
