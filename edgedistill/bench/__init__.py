"""Benchmarking exported students: backends, devices (cpu, cuda, jetson, remote), timing and the report."""
