"""Trace replay: trace readers, the load driver, metrics and reports."""
