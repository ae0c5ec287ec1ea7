"""wsss-bench: a benchmark harness for weakly supervised medical image segmentation."""
__version__ = "0.1.0"
