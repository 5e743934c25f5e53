"""Zadarma: webhook signatures and events (pure), a call computed from its events, the
signed REST client (treq) and the account's time zone; the ``zadarma`` provider kind
that composes them (``provider``) and its click-to-call dialling (``dialling``).
"""
