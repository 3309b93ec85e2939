"""Benchmark harness: ublkmig against other live-migration peers (QEMU mirror)."""
