"""Durability: an event is committed, or fsynced to the spool before it is acknowledged,
and replayed in order when the database is back.
"""
