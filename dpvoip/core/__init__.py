"""The pure core: phone numbers, outcomes, texts, matching, dialling policy, rate limits,
the call happenings and the ticket and sales-side rules. No I/O, no reactor, no clock of
its own: everything here is tested with plain data (test_layering keeps it that way).
"""
