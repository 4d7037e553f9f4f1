"""Model analysis that stands on its own: outlier tokens (PrefixQuant's detection and prefix selection)."""

from .outliers import OutlierReport, analyze, plot_ratios, select_prefix

__all__ = ["OutlierReport", "analyze", "plot_ratios", "select_prefix"]
