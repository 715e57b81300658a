"""autodfp.compress."""
