"""The plug-in tables, one entry per item, each carrying its own conditions (in the style of peft's dispatchers):
memory savers, strategies, training backends.

Depends on the layers below (facts, architecture, memory, speed), never on the decision.
"""
