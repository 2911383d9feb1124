-- A tenant is its name, byte for byte, everywhere (#24): `DrillCase` and `drillcase`
-- are two tenants. Every tenant column compares with a binary collation, as Rust's `==`
-- does and as idempotency keys already did (0008); a case-insensitive comparison here let
-- one tenant read, change and delete another's apps. A test checks every column named
-- `tenant` (or the `tenants` table's `name`) is binary, so a new one cannot drift.
-- New names that differ from an existing tenant's only in case are refused when a token
-- is made (409), so no two tenants look alike either.
ALTER TABLE rentals MODIFY tenant VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL;
ALTER TABLE tokens  MODIFY tenant VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL;
ALTER TABLE apps    MODIFY tenant VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL;
ALTER TABLE tenants MODIFY name   VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL;

-- Since when a worker is quarantined (NULL: in service), shown beside the reason, so an
-- operator sees how long it has been out; set and cleared with the reason.
ALTER TABLE workers ADD COLUMN quarantined_at DATETIME(6) NULL AFTER quarantine_reason;
UPDATE workers SET quarantined_at = updated_at WHERE quarantine_reason IS NOT NULL;
