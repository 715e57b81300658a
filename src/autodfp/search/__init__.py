"""autodfp.search."""
