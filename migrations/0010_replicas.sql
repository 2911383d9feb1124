-- Every orion process says it is alive once a `leader.renew_every`, whether it leads or
-- not: a request it was running when it stopped saying so died with it. An
-- Idempotency-Key records the process running its request, so that a client's retry
-- runs the request again as soon as that process is gone, rather than after the
-- request's whole deadline.
CREATE TABLE replicas (
    -- As leases.holder: the instance's name and a nonce of its start.
    holder     VARCHAR(128) NOT NULL,
    instance   VARCHAR(128) NOT NULL,
    started_at DATETIME(6)  NOT NULL,
    seen_at    DATETIME(6)  NOT NULL,
    PRIMARY KEY (holder),
    KEY replicas_seen (seen_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_unicode_ci;

-- NULL for keys recorded before this column: their requests are retried after the
-- deadline only, as before.
ALTER TABLE idempotency_keys ADD COLUMN holder VARCHAR(128) NULL;
