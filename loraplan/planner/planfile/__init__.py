"""The plan file: its schema (`Plan`), validation against the plug-in tables, and reading and writing files.

Depends on planner.facts and planner.plugins.
"""
