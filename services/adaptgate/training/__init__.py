"""Training: datasets, job records, the Ray runner and the `head` and `lora` training loops (see TRAINING.md).

Importing this package is cheap and never imports Ray, gRPC or the api layer: Ray is imported
only when a `RayRunner` starts, so the engine and server stay usable where Ray is absent.
"""
