"""wsss-bench: a benchmark harness for weakly supervised medical image segmentation."""
__version__ = "0.1.0"

#: The version of the plugin API (the interfaces in :mod:`wsss_bench.interfaces` and what a
#: plugin may call on its RunContext).  It changes only when a plugin written for the previous
#: version could break; docs/plugins.md lists every version and what changed.  A plugin may
#: declare the version it was written for as the class attribute ``plugin_api``.
#:
#: 1. first published: a refiner gets one map source, ``refine(batch, maps, cam)``.
#: 2. combined map sources: ``refine(batch, maps, sources)`` with sequences.
#: 3. the context knows no method: ``ctx.classifier()`` became
#:    ``wsss_bench.nn.classifier.get_classifier(ctx)``; ``ctx.upstream`` and ``ctx.recording``.
PLUGIN_API = 3
