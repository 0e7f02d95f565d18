"""What `plan` shows: the result with every fact behind the plan (and its JSON), and the rich tables.

Depends on every layer below it.
"""
