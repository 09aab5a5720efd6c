"""Exceptions users can catch. Each is a ``ValueError`` so callers that only know the
standard library still handle bad input, and each message says what is wrong."""


class MedvlError(Exception):
    """Base class of medvl's own errors."""


class InvalidImageError(MedvlError, ValueError):
    """An image file that cannot be used as a chest X-ray (corrupt, not an image, not a chest...)."""


class ImageNotFoundError(InvalidImageError, FileNotFoundError):
    """An image path that does not exist (also a ``FileNotFoundError``)."""


class InvalidReportError(MedvlError, ValueError):
    """A report that cannot be used (empty, whitespace only, no usable section)."""


class ConfigError(MedvlError, ValueError):
    """A configuration with an unknown key, a wrong type or an impossible value."""


class RunError(MedvlError, ValueError):
    """A run directory that is missing, incomplete or of the wrong stage."""


class DataError(MedvlError, ValueError):
    """A dataset directory that is missing or malformed."""
