"""Training: datasets, job records, the Ray runner and the `head` training loop.

Importing this package is cheap and never imports Ray, gRPC or the api layer: Ray is imported
only when a `RayRunner` starts, so the engine and server stay usable where Ray is absent.
"""
