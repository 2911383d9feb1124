-- Where Orion POSTs a rental's new connection details after a migration.
ALTER TABLE rentals ADD COLUMN notify_url TEXT NULL AFTER password_hash;
