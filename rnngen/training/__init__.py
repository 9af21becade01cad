"""Training and export: the part of rnngen that needs torch (`pip install rnngen[train]`)."""
