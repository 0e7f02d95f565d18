"""What the user named: options and their defaults, the request, the hardware, the dataset, installed versions.

The bottom of the pipeline: these modules import nothing from the planner's other sub-packages.
"""
