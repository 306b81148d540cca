"""The migration of version 2 of the update tests' app: `migrate.py DSN` prices every item,
writes the names in capitals and starts an audit table, in one transaction."""

import sys

import psycopg

with psycopg.connect(sys.argv[1]) as conn:
    conn.execute("ALTER TABLE items ADD COLUMN price integer")
    conn.execute("UPDATE items SET name = upper(name), price = 10 * id")
    conn.execute("CREATE TABLE audit (item_id integer, note text)")
    conn.execute("INSERT INTO audit SELECT id, 'priced' FROM items")
print("migrated")
