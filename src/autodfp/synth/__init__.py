"""autodfp.synth."""
