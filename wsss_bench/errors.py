"""Errors that are the user's to fix: the CLI prints them as one line and exits 2."""
from __future__ import annotations


class UserError(Exception):
    """A mistake in input, data or configuration.

    The message names the file, plugin or parameter at fault and says what would fix it.
    The CLI prints it without a traceback and exits with code 2.
    """


class PluginError(UserError):
    """A plugin could not be loaded, registered or configured."""
