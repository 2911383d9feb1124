-- Placement by site and labels (#17). A worker's labels are free-form `key = value`
-- pairs from the inventory (a JSON object); a rent may ask for a site, for labels
-- (all of them), or prefer a site. The rental keeps what it asked for: its moves keep
-- the labels, and prefer the site it lives in.
-- TEXT rather than MariaDB's JSON (a binary-collated LONGTEXT, read back as bytes),
-- with JSON's check.
ALTER TABLE workers ADD COLUMN labels TEXT NOT NULL DEFAULT '{}' CHECK (JSON_VALID(labels));
ALTER TABLE workers ADD KEY workers_site (site);

ALTER TABLE rentals
    ADD COLUMN want_site   VARCHAR(64) NULL,
    ADD COLUMN want_labels TEXT NULL CHECK (JSON_VALID(want_labels)),
    ADD COLUMN prefer_site VARCHAR(64) NULL;

-- The inventory file last applied, by digest: at a start, a file that has not changed
-- since is not applied again, so that workers added, changed or retired through the
-- API since then are kept. One row.
CREATE TABLE inventory_applied (
    id         TINYINT UNSIGNED NOT NULL PRIMARY KEY,
    digest     CHAR(64)    NOT NULL,
    applied_at DATETIME(6) NOT NULL
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_unicode_ci;
