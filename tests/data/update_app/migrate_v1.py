"""The migration of version 1 of the update tests' app: `migrate.py DSN` changes nothing."""

print("nothing to migrate")
