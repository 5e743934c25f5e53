"""dpvoip: one Twisted daemon for the D.P. Economy CRM's telephony."""

__version__ = "0.1.0"
