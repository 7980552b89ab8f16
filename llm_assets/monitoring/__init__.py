"""Monitoring: the server's traffic ingested per time window, drift per model size, and the feedback
that closes the loop back to training (docs/monitoring.md)."""
