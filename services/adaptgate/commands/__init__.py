"""Client-side subcommands of `adaptgate` that need more than a few lines."""
