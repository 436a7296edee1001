"""Merge methods: pure tensor functions plus the one hand-written registry (`registry.METHODS`)."""
