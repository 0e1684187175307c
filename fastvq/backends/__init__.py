"""One module per backend; each says why it is unavailable."""
