"""The R1 recipe as jobs that drive the parts (DESIGN.md, "Layout"). Today: the shipped
benchmarks (`benchmarks`), the samples file (`samples`), R1's evaluation metrics (`metrics`)
and `aha eval --samples-from` (`evaluation`)."""
