"""One module per decoding method; each registers its strategies by name and is imported on first use."""
