"""The speed model: FLOPs per token and expected tokens/s, and the time a step spends in collectives and host copies.

Depends on planner.facts, planner.architecture and planner.memory.
"""
