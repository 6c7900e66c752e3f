"""Speed benchmarks of KV caches (``kvlab bench``)."""
