"""The data half of the graph: ingestion, cleaning, near-duplicate removal and splits."""
