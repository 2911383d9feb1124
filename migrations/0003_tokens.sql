-- Tenant API tokens. Only a SHA-256 of each token is kept: the token itself is shown
-- once, when it is made.
CREATE TABLE tokens (
    id         CHAR(36)    NOT NULL PRIMARY KEY,
    tenant     VARCHAR(64) NOT NULL,
    token_hash CHAR(64)    NOT NULL,
    created_at DATETIME(6) NOT NULL,
    revoked_at DATETIME(6) NULL,
    UNIQUE KEY tokens_hash (token_hash),
    KEY tokens_tenant (tenant)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_unicode_ci;
