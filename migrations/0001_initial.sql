-- Orion's state. Every timestamp is UTC (written with UTC_TIMESTAMP(6)).

-- The inventory as Orion last saw it, plus what the probes observed.
CREATE TABLE workers (
    id                    BIGINT UNSIGNED AUTO_INCREMENT PRIMARY KEY,
    name                  VARCHAR(64)  NOT NULL,
    site                  VARCHAR(64)  NOT NULL,
    ssh_host              VARCHAR(255) NOT NULL,
    ssh_port              SMALLINT UNSIGNED NOT NULL,
    public_host           VARCHAR(255) NOT NULL,
    public_port           SMALLINT UNSIGNED NOT NULL,
    -- Host key pinned in the inventory; wins over known_host_key.
    pinned_host_key       TEXT NULL,
    -- Host key trusted on first use.
    known_host_key        TEXT NULL,
    -- unknown | alive | dead
    status                VARCHAR(16)  NOT NULL DEFAULT 'unknown',
    consecutive_failures  INT UNSIGNED NOT NULL DEFAULT 0,
    consecutive_successes INT UNSIGNED NOT NULL DEFAULT 0,
    -- Set when the worker must not be used (host key changed); cleared by an operator.
    quarantine_reason     TEXT NULL,
    -- Gone from the inventory: never offered again, kept for history.
    retired               BOOLEAN NOT NULL DEFAULT FALSE,
    -- The rental that holds this worker, serving it or awaiting cleanup. NULL = free.
    rental_id             CHAR(36) NULL,
    last_checked          DATETIME(6) NULL,
    last_seen_alive       DATETIME(6) NULL,
    probe_latency_ms      INT UNSIGNED NULL,
    last_probe_error      TEXT NULL,
    created_at            DATETIME(6) NOT NULL,
    updated_at            DATETIME(6) NOT NULL,
    UNIQUE KEY workers_name (name),
    KEY workers_rental (rental_id),
    KEY workers_free (status, rental_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_unicode_ci;

CREATE TABLE rentals (
    id            CHAR(36)     NOT NULL PRIMARY KEY,
    tenant        VARCHAR(64)  NOT NULL,
    username      VARCHAR(32)  NOT NULL,
    public_key    TEXT NULL,
    -- SHA-512 crypt hash; the password itself is never stored.
    password_hash VARCHAR(255) NULL,
    -- provisioning | active | releasing | released | failed
    status        VARCHAR(16)  NOT NULL,
    -- The worker currently serving the rental.
    worker_id     BIGINT UNSIGNED NULL,
    created_at    DATETIME(6)  NOT NULL,
    updated_at    DATETIME(6)  NOT NULL,
    ended_at      DATETIME(6)  NULL,
    -- A username is held by at most one rental that is not over.
    live_username VARCHAR(32) AS (IF(status IN ('released', 'failed'), NULL, username)) PERSISTENT,
    UNIQUE KEY rentals_live_username (live_username),
    KEY rentals_status (status),
    KEY rentals_worker (worker_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_unicode_ci;

-- Every worker a rental has lived on, in order.
CREATE TABLE placements (
    id         BIGINT UNSIGNED AUTO_INCREMENT PRIMARY KEY,
    rental_id  CHAR(36)        NOT NULL,
    worker_id  BIGINT UNSIGNED NOT NULL,
    -- provisioning | active | stale | released
    state      VARCHAR(16)     NOT NULL,
    started_at DATETIME(6)     NOT NULL,
    ended_at   DATETIME(6)     NULL,
    KEY placements_rental (rental_id),
    KEY placements_worker (worker_id, state)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_unicode_ci;

-- Append-only log of what happened: probe state changes, provisions, releases, failures.
CREATE TABLE events (
    id        BIGINT UNSIGNED AUTO_INCREMENT PRIMARY KEY,
    at        DATETIME(6)  NOT NULL,
    kind      VARCHAR(48)  NOT NULL,
    worker    VARCHAR(64)  NULL,
    rental_id CHAR(36)     NULL,
    message   TEXT         NOT NULL,
    KEY events_at (at),
    KEY events_rental (rental_id),
    KEY events_worker (worker)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_unicode_ci;
