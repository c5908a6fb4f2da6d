"""Tenant datasets: reading uploads row by row, checking them, storing them, and splitting them for training."""
