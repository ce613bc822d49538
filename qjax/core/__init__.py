"""Core types and math every other layer builds on: errors, flat pytree paths, bit packing, the uniform quantizer,
linear algebra, progress bars, and the stored formats (``formats/``)."""
