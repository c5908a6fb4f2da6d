"""The training methods (`head`, `lora`, `embed`), the registry naming them, and `auto`, which picks one.

A method is one module defining its parameters, its training loop, the adapter files it publishes
and its `METHOD` entry (method.py), plus one line in registry.py. Importing this package alone is cheap.
"""
