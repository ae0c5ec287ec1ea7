"""Built-in plugins of wsss-bench (imported as ``wsss_bench_plugins``), one module per method.

Each module is listed as an entry point of the ``wsss_bench`` group in pyproject.toml, the
same way a third-party package adds its own.
"""
