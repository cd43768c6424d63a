"""The version of gsops, in one place: the package re-exports it and setup.py reads this file."""
__version__ = "0.1.0"
