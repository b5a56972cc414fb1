"""Benchmarks: dialogpt-edge against PyTorch and peer runtimes, each backend in its own process."""
