"""rentalml: recommendations for rental marketplaces (core library and import root)."""

__version__ = "0.1.0"
