"""Data: rows from files or hubs, each format with its label masks, held-out splits, and batches."""
