"""The layer database: per-layer solutions and error tables, built once for every allocator."""
