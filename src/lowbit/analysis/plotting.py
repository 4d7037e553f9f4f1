"""Optional plotting: matplotlib (the ``plot`` extra) in a headless backend, or None when it is not installed."""

from __future__ import annotations


def pyplot():
    """``matplotlib.pyplot`` with the Agg backend, or None (callers skip their plot and say so)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'lowbit[plot]'): no plot")
        return None
    return plt
