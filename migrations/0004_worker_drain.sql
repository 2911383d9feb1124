-- Maintenance mode: a drained worker gets no new rentals and its tenants are moved away.
ALTER TABLE workers ADD COLUMN drained BOOLEAN NOT NULL DEFAULT FALSE AFTER retired;
