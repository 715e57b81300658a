"""autodfp.eval."""
