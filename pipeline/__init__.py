"""SemMAE pipeline library: data, models, masking, losses, engine and checkpoint I/O.

Knows nothing about DVC or the command line (see ``stages/``); importable and testable on a CPU.
"""
