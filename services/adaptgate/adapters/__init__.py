"""The versioned adapter store, its validation, and the serving cache."""
