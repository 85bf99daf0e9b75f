"""Bad user input: one error class and one CLI wrapper for the whole project.

Both live in the torch-free exporters (which may import nothing from the torch side); the core
uses them under the name MoteError.
"""
from .exporters.errors import MoteExportError as MoteError, cli_entry

__all__ = ["MoteError", "cli_entry"]
