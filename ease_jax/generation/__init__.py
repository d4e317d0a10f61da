"""Generation on the training decoder: the KV-cache decoder (`generate`), continuous batching
over fixed slots (`continuous`), and resumable chunked output files (`files`)."""
