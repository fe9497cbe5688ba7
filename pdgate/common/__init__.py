"""The bottom layer: low-level code that every layer of pdgate may use and that imports none of them."""
