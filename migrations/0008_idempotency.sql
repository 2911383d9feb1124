-- Idempotency keys of POST /api/rent and POST /api/apps: a client that retries with the
-- same `Idempotency-Key` (after a timeout, or a replica that died) gets the same rental or
-- app, never a second one. Kept a day. No answer body is stored: a replay shows the
-- resource as it is now, and a generated password is never written anywhere.
CREATE TABLE idempotency_keys (
    -- Compared byte for byte, as tenants are: `ACME` is not `acme`.
    tenant       VARCHAR(64)  COLLATE utf8mb4_bin NOT NULL,
    -- rent | apps
    route        VARCHAR(16)  NOT NULL,
    -- Compared byte for byte: keys differing only in case are two keys.
    idem_key     VARCHAR(255) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    -- SHA-256 of the request's JSON, keys sorted: the same key with another request is
    -- refused.
    request_hash CHAR(64)     NOT NULL,
    -- The rental's id, or the app's name.
    resource_id  VARCHAR(64)  NOT NULL,
    -- Set once the request succeeded; NULL while it runs.
    done_at      DATETIME(6)  NULL,
    created_at   DATETIME(6)  NOT NULL,
    PRIMARY KEY (tenant, route, idem_key),
    KEY idempotency_keys_created (created_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_unicode_ci;
