"""The shared frozen base model and batched execution. Knows nothing of gRPC or tenants."""
