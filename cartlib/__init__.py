"""cartlib: the library of the CART benchmark suite (see DESIGN.md, README.md)."""
