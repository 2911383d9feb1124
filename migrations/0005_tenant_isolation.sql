-- Tenant isolation.

-- The uid of the placement's account on its worker: provisioning.uid_min + id, so a uid
-- is never handed to a second tenant on any worker. NULL for placements made before.
ALTER TABLE placements ADD COLUMN uid INT UNSIGNED NULL AFTER worker_id;

-- When the rental ends by itself (NULL: never), and the token that made it (a revoked
-- token can take its rentals with it).
ALTER TABLE rentals
    ADD COLUMN expires_at DATETIME(6) NULL AFTER ended_at,
    ADD COLUMN token_id CHAR(36) NULL AFTER tenant,
    ADD KEY rentals_expiry (status, expires_at),
    ADD KEY rentals_token (token_id),
    ADD KEY rentals_tenant (tenant, status);

-- A per-token limit on the tenant's live rentals (NULL: the configured default).
ALTER TABLE tokens ADD COLUMN max_rentals INT UNSIGNED NULL AFTER tenant;

-- One row per tenant that has rented: its row lock serialises that tenant's rents, so
-- the quota holds under concurrent requests without locking anyone else's.
CREATE TABLE tenants (
    name       VARCHAR(64) NOT NULL PRIMARY KEY,
    created_at DATETIME(6) NOT NULL
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_unicode_ci;
