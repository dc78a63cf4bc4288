"""Errors shown to users as one clear line (no traceback) by the CLI."""


class EntityClipError(Exception):
    """Bad input the user can fix. The message says what is wrong and how to fix it."""
