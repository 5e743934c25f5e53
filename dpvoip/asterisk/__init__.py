"""Asterisk (and FreePBX on top of it) through the Asterisk Manager Interface: the framing
(``messages``), following calls from channel events (``calls``), the settings, and the
connection that logs in, keeps alive and dials (``service``; the wire is
``dpvoip.protocols.ami``)."""
