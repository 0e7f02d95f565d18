"""The model's architecture and its parameters: families counted by arithmetic, any other decoder from a
meta-device build, where the model's config comes from, and which modules LoRA adapts.

Depends on planner.facts only.
"""
