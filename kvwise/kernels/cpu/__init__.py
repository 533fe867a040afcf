"""CPU kernel building blocks for numba: explicit SIMD (`simd`), the threading runtime
(`runtime`), the spin-barrier thread team (`team`) and the CPU feature table (`features`).

Invariants:
- A leaf: nothing here imports another kvwise package (checked by the import-linter contracts
  that `make test` runs).
- Importing a module here compiles nothing and starts no threads; numba runtime set-up happens
  on first use.
"""
