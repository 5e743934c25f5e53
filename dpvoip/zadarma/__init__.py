"""Zadarma: webhook signatures and events (pure), a call computed from its events, the
signed REST client (treq) and the account's time zone.
"""
