"""The only door to PostgreSQL: the pool, the embedded server, migrations, transactions and
every SQL statement dpvoip sends. Nothing outside this package imports the drivers or
holds SQL text (test_layering checks it).
"""
