"""edgefleet agent: the device side. Imports nothing else of edgefleet."""

__version__ = "0.1.0"
