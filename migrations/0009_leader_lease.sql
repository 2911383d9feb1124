-- The loops' leader lease: one row per lease. Exactly one Orion process runs the control
-- loops at a time, the holder of a lease that has not expired (by the database's clock,
-- so replicas' clocks do not matter). `epoch` grows at every takeover: it is the fencing
-- token. Every write a loop makes first bumps `fenced_writes` on this row where holder,
-- epoch and expiry still match, in the same transaction: an ex-leader (paused,
-- partitioned) cannot write, and on a Galera cluster the bump conflicts with a takeover
-- made on another node, so one of the two fails certification.
CREATE TABLE leases (
    name          VARCHAR(32)  NOT NULL PRIMARY KEY,
    holder        VARCHAR(128) NOT NULL,
    epoch         BIGINT UNSIGNED NOT NULL,
    expires_at    DATETIME(6)  NOT NULL,
    acquired_at   DATETIME(6)  NOT NULL,
    fenced_writes BIGINT UNSIGNED NOT NULL DEFAULT 0
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_unicode_ci;
