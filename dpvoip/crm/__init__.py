"""What dpvoip knows of the CRM: the tables and columns it needs, the formats of its
logins, and the CRM's own DDL (``sql/``) for standalone mode and the tests.
"""
