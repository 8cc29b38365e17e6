"""Errors a user can cause that more than one concern raises; each message says which key to change."""


class ModelError(ValueError):
    """The model or tokenizer cannot be used as configured; the message says which key to change."""
