-- A tenant is its name, and no two tenants' names differ only in case (#24). Tenant
-- columns compare without case (the tables' collation), Rust compares bytes: the two
-- agree on every pair of names that can exist only if no two names differ only in case.
-- Before this, tokens for `DrillCase` and `drillcase` could both be made, and the second
-- could read, change and delete the first's apps. Tokens for such a name are now refused
-- when made (409); names already ambiguous stop this migration, naming them, until the
-- operator revokes and deletes one of the two (`DELETE FROM tokens WHERE tenant = BINARY
-- '…'`, after moving what it holds).
BEGIN NOT ATOMIC
    DECLARE clash TEXT;
    SELECT GROUP_CONCAT(DISTINCT CAST(a.tenant AS CHAR) SEPARATOR ', ') INTO clash
      FROM tokens a JOIN tokens b
        ON a.tenant = b.tenant AND CAST(a.tenant AS BINARY) <> CAST(b.tenant AS BINARY);
    IF clash IS NOT NULL THEN
        SET clash = CONCAT('tenant names that differ only in case: ', clash,
                           '; keep one of each (see migrations/0012_hostile_tenants.sql)');
        SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = clash;
    END IF;
END;

-- Since when a worker is quarantined (NULL: in service), shown beside the reason, so an
-- operator sees how long it has been out; set and cleared with the reason.
ALTER TABLE workers ADD COLUMN quarantined_at DATETIME(6) NULL AFTER quarantine_reason;
UPDATE workers SET quarantined_at = updated_at WHERE quarantine_reason IS NOT NULL;

-- Why Caddy refused this app's route, when it did (NULL: applied). Each app's route is
-- applied on its own: one Caddy refuses is reported on that app, and every other app is
-- still served.
ALTER TABLE apps ADD COLUMN route_error TEXT NULL;
