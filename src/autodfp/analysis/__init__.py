"""autodfp.analysis."""
