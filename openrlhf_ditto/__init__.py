"""DITTO (Shaikh et al., arXiv 2406.00888) for OpenRLHF."""

__version__ = "0.1.0"
