-- Rental continuity: a stable SSH endpoint per rental, one host identity for every
-- worker (a host certificate signed by Orion's CA), and the tenant's home kept across a
-- failover (snapshots).

-- The gateway's ports (`gateway.ports`), one row each: a port is given to one live
-- rental at a time, claimed like a worker (`FOR UPDATE SKIP LOCKED`), and free again
-- once its rental is over. Rows outside the configured range are kept and never given.
CREATE TABLE endpoints (
    port      SMALLINT UNSIGNED NOT NULL PRIMARY KEY,
    -- The rental given this port last; free when NULL or when that rental is over.
    rental_id CHAR(36) NULL,
    KEY endpoints_rental (rental_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_unicode_ci;

-- The port a rental was given, kept after it ends for its history.
ALTER TABLE rentals ADD COLUMN endpoint_port SMALLINT UNSIGNED NULL AFTER worker_id;

-- The host key Orion's CA vouches for on this worker (the pinned one, at signing time)
-- and until when: a new certificate is installed when the key it names is no longer the
-- trusted one, or when it nears its end.
ALTER TABLE workers
    ADD COLUMN host_cert_key TEXT NULL AFTER known_host_key,
    ADD COLUMN host_cert_expires DATETIME(6) NULL AFTER host_cert_key;

-- Snapshots of rentals' homes (a gzip'd tar streamed over SSH), stored here in chunks:
-- every control-plane replica reaches them, the database's own replication keeps them,
-- and no worker ever holds another tenant's files. A snapshot is written chunk by chunk
-- and becomes the rental's snapshot only once complete; older ones go then.
CREATE TABLE snapshots (
    id          BIGINT UNSIGNED AUTO_INCREMENT PRIMARY KEY,
    rental_id   CHAR(36)     NOT NULL,
    -- The worker it was taken on.
    worker_id   BIGINT UNSIGNED NOT NULL,
    -- What the worker reported of the home (names, sizes, times, modes): the same
    -- fingerprint next time means nothing changed and nothing is sent.
    fingerprint VARCHAR(64)  NOT NULL,
    bytes       BIGINT UNSIGNED NOT NULL DEFAULT 0,
    complete    BOOLEAN      NOT NULL DEFAULT FALSE,
    obsolete    BOOLEAN      NOT NULL DEFAULT FALSE,
    -- When the worker started reading the home.
    taken_at    DATETIME(6)  NOT NULL,
    KEY snapshots_rental (rental_id, complete)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_unicode_ci;

CREATE TABLE snapshot_chunks (
    snapshot_id BIGINT UNSIGNED NOT NULL,
    seq         INT UNSIGNED    NOT NULL,
    data        MEDIUMBLOB      NOT NULL,
    PRIMARY KEY (snapshot_id, seq),
    CONSTRAINT snapshot_chunks_snapshot FOREIGN KEY (snapshot_id)
        REFERENCES snapshots (id) ON DELETE CASCADE
) ENGINE = InnoDB;

-- The fingerprint of the rental's home while it is over `snapshots.max_bytes`: its last
-- snapshot is kept, the event is written once, and the home is not streamed again until
-- it changes.
ALTER TABLE rentals ADD COLUMN snapshot_oversize VARCHAR(64) NULL;
