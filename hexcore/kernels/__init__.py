"""Kernels per device: select.py chooses (the one place), build.py compiles the C++ CPU loops in csrc/
on first use; the other modules wrap each loop."""
