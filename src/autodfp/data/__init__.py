"""autodfp.data."""
