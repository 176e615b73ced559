"""Harnesses shared by the benchmarks and the tests: a real daemon (daemon_helpers), the chaos
batch (chaos), real zombie trees (procs_helpers), a fake libnvidia-ml.so.1 (fakenvml)."""
