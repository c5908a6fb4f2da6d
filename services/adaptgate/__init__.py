"""adaptgate: one frozen base model, many tenants' adapters, served over gRPC."""

__version__ = "0.1.0"
