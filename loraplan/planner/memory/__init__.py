"""The memory model: one micro-step's configuration (`MicroStep`), each term a function with its formula,
the fitted coefficients, FSDP's per-rank terms and the load peak.

Depends on planner.facts and planner.architecture.
"""
