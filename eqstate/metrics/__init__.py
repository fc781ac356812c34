"""Metrics as state modules: `Mean`, `Accuracy`, and a `Collection` of several."""

from ._metrics import Accuracy as Accuracy, Collection as Collection, Mean as Mean, Metric as Metric


Average = Mean
"""Another name for `Mean`."""
