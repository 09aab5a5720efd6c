"""The installed medvl version, in a leaf module that every other module may import."""

__version__ = "0.2.0"
