-- Apps: container workloads on the workers, kept in their desired state by the apps loop.

-- Where a worker's instances are reached (their `port` on this address; NULL: the
-- worker's public host), and the container on the worker's engine whose PID and network
-- namespaces instances join (the lab, where workers are containers sharing the host's
-- engine: a stopped worker takes its instances with it). Both from the inventory.
ALTER TABLE workers
    ADD COLUMN app_host VARCHAR(255) NULL AFTER public_port,
    ADD COLUMN instances_join VARCHAR(128) NULL AFTER app_host;

-- What a tenant asked for. `generation` counts changes of what an instance runs (image,
-- command, env): instances of an older generation are replaced one at a time.
CREATE TABLE apps (
    id          BIGINT UNSIGNED AUTO_INCREMENT PRIMARY KEY,
    tenant      VARCHAR(64)  NOT NULL,
    name        VARCHAR(63)  NOT NULL,
    image       VARCHAR(255) NOT NULL,
    replicas    INT UNSIGNED NOT NULL,
    -- JSON array of strings, NULL: the image's own command.
    command     TEXT NULL,
    -- JSON object of strings.
    env         TEXT NOT NULL,
    port        SMALLINT UNSIGNED NULL,
    -- What Caddy's active health check requests on each instance.
    health_path VARCHAR(255) NOT NULL DEFAULT '/',
    generation  INT UNSIGNED NOT NULL DEFAULT 1,
    -- Deleted by its tenant: its instances are being removed, then the row goes.
    deleting    BOOLEAN NOT NULL DEFAULT FALSE,
    created_at  DATETIME(6) NOT NULL,
    updated_at  DATETIME(6) NOT NULL,
    -- A name is held by at most one app that is not being deleted, whatever its tenant:
    -- it is the app's address (`/apps/<name>/`, `<name>.apps.<site>`).
    live_name   VARCHAR(63) AS (IF(deleting, NULL, name)) PERSISTENT,
    UNIQUE KEY apps_live_name (live_name),
    KEY apps_tenant (tenant)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_unicode_ci;

-- One container of an app on one worker, from its placement to its removal.
CREATE TABLE instances (
    id            BIGINT UNSIGNED AUTO_INCREMENT PRIMARY KEY,
    app_id        BIGINT UNSIGNED NOT NULL,
    worker_id     BIGINT UNSIGNED NOT NULL,
    generation    INT UNSIGNED NOT NULL,
    -- pending | running | exited | stopping | gone
    state         VARCHAR(16)  NOT NULL,
    -- The container's name on the worker's engine.
    container     VARCHAR(200) NOT NULL,
    restarts      INT UNSIGNED NOT NULL DEFAULT 0,
    -- Exits in a row without a long enough run between them: drives the back-off.
    crashes       INT UNSIGNED NOT NULL DEFAULT 0,
    exit_code     INT NULL,
    -- Why the last start failed, or the log tail of the last exit.
    last_error    TEXT NULL,
    started_at    DATETIME(6) NULL,
    -- Not started again before this (the crash back-off).
    next_start_at DATETIME(6) NULL,
    created_at    DATETIME(6) NOT NULL,
    updated_at    DATETIME(6) NOT NULL,
    -- Set when the instance is over: removed from its worker, or lost with it.
    ended_at      DATETIME(6) NULL,
    UNIQUE KEY instances_container (container),
    KEY instances_app (app_id, ended_at),
    KEY instances_worker (worker_id, ended_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_unicode_ci;
