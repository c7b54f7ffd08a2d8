"""Benchmark harness behind `bench/run.py`: targets, wrk runs and the report.

Everything here starts its own processes on 127.0.0.1, in temporary
directories, and stops them by pid. Linux only, because peak memory, CPU time
and per-process sockets are read from /proc.
"""
