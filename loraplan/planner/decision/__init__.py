"""The decision: the request resolved, the rules and their reasons, the placement across strategies, what would
fit, the longest context, the estimate and the same request on every card.

Depends on every layer below it; nothing below imports it.
"""
