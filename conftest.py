"""Test-session settings that must precede the first import of torch."""

import os

# OpenMP threads that spin while waiting starve each other on a shared 2-core machine (a 20-token
# forward went from 0.15 s to 3.6 s); passive waiting costs nothing measurable when the cores are free.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
