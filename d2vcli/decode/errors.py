"""The decoding errors, in their own module because every decode/* module raises them."""

from __future__ import annotations

from d2vcli.errors import UserError


class DecodeError(UserError):
    """A decoding request that cannot run; the message says what to change."""


class MissingDependency(DecodeError):
    """An optional package that beam search needs is missing; raised before any work starts."""
