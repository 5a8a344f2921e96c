"""The commands of `python -m picogpt_lightning`, one module each; picogpt_lightning/cli.py maps names to them.

Each module holds the function its command calls (usable from Python too, e.g.
`quantize_checkpoint`) and the command itself, whose signature and docstring jsonargparse
turns into its flags and help.
"""
