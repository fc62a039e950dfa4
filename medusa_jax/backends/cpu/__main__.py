"""``python -m medusa_jax.backends.cpu [--bench] [--tune] [--force]``: builds the CPU decode kernel
for this machine and measures up to how many rows it beats XLA's dot (``kernel.main``)."""

from medusa_jax.backends.cpu import kernel

kernel.main()
