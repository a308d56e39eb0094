-- mtool schema v1: potential matches, import jobs and their checkpoints, nodes, match cycles.

-- The seed's table, without its surrogate uuid: the unique key is the primary key (measured:
-- index maintenance dominates load cost, and a second index on a random uuid doubles it).
-- Ids use the "C" collation: byte order is what a dedupe/upsert needs and sorts several times
-- faster than a linguistic collation. Partitioned by group so that a group's new rows can be
-- built in a fresh table and swapped in atomically (`--replace`, match cycles, first imports).
CREATE TABLE potential_matches (
    group_id             uuid         NOT NULL,
    domain_id            uuid         NOT NULL,
    processing_cycle_id  varchar(36)  NOT NULL,
    reference_id         varchar(255) COLLATE "C" NOT NULL,
    matched_reference_id varchar(255) COLLATE "C" NOT NULL,
    compatibility_score  real         NOT NULL,
    matched_at           timestamptz  NOT NULL,
    PRIMARY KEY (group_id, reference_id, matched_reference_id)
) PARTITION BY LIST (group_id);

-- One partition per group lives here, named potential_matches_<group hex>.
CREATE SCHEMA mtool_part;
-- Per-job load tables and prepared partitions; dropped when their job completes.
CREATE SCHEMA mtool_stage;

CREATE TABLE import_jobs (
    job_id          uuid        PRIMARY KEY,
    source_uris     text[]      NOT NULL,
    fingerprint     text        NOT NULL,
    group_id        uuid,
    domain_id       uuid,
    mode            text        NOT NULL DEFAULT 'upsert' CHECK (mode IN ('upsert', 'replace')),
    options         jsonb       NOT NULL DEFAULT '{}',
    status          text        NOT NULL DEFAULT 'PENDING'
                    CHECK (status IN ('PENDING', 'PROCESSING', 'COMPLETED', 'FAILED')),
    total_rows      bigint,
    processed_rows  bigint      NOT NULL DEFAULT 0,
    rejected_rows   bigint      NOT NULL DEFAULT 0,
    written_rows    bigint,
    checkpoint      jsonb       NOT NULL DEFAULT '{}',
    error           text,
    attempts        integer     NOT NULL DEFAULT 0,
    kafka_topic     text,
    kafka_partition integer,
    kafka_offset    bigint,
    created_at      timestamptz NOT NULL DEFAULT now(),
    started_at      timestamptz,
    finished_at     timestamptz,
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX import_jobs_fingerprint ON import_jobs (fingerprint);
CREATE INDEX import_jobs_status ON import_jobs (status, created_at);

-- The checkpoint: one row per committed chunk (file, row group, chunk of --batch-rows rows),
-- written in the same transaction as the chunk's rows, so a chunk is loaded exactly once.
CREATE TABLE import_checkpoints (
    job_id       uuid    NOT NULL REFERENCES import_jobs ON DELETE CASCADE,
    file_index   integer NOT NULL,
    row_group    integer NOT NULL,
    chunk        integer NOT NULL,
    rows_loaded  bigint  NOT NULL,
    rows_rejected bigint NOT NULL,
    committed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, file_index, row_group, chunk)
);

-- Rejected rows, committed with their chunk (so a resumed job never reports one twice).
CREATE TABLE import_rejects (
    job_id     uuid    NOT NULL REFERENCES import_jobs ON DELETE CASCADE,
    file_index integer NOT NULL,
    row_number bigint  NOT NULL,
    reason     text    NOT NULL,
    record     jsonb   NOT NULL,
    PRIMARY KEY (job_id, file_index, row_number)
);

-- The groups a job carries, with the load table that holds its rows until the job commits.
CREATE TABLE import_job_groups (
    job_id     uuid NOT NULL REFERENCES import_jobs ON DELETE CASCADE,
    group_id   uuid NOT NULL,
    load_table text NOT NULL,
    PRIMARY KEY (job_id, group_id)
);

CREATE TABLE nodes (
    domain_id    uuid         NOT NULL,
    group_id     uuid         NOT NULL,
    reference_id varchar(255) COLLATE "C" NOT NULL,
    type         text,
    metadata     jsonb        NOT NULL DEFAULT '{}',
    embedding    real[],
    created_at   timestamptz  NOT NULL DEFAULT now(),
    updated_at   timestamptz  NOT NULL DEFAULT now(),
    PRIMARY KEY (group_id, reference_id)
);
CREATE INDEX nodes_domain ON nodes (domain_id, group_id);

CREATE TABLE match_cycles (
    cycle_id    varchar(36) NOT NULL,
    group_id    uuid        NOT NULL,
    domain_id   uuid        NOT NULL,
    status      text        NOT NULL CHECK (status IN ('PENDING', 'PROCESSING', 'COMPLETED', 'FAILED')),
    node_count  bigint,
    edge_count  bigint,
    timings     jsonb       NOT NULL DEFAULT '{}',
    error       text,
    attempts    integer     NOT NULL DEFAULT 0,
    started_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    PRIMARY KEY (group_id, cycle_id)
);

CREATE TABLE node_participation (
    group_id     uuid         NOT NULL,
    reference_id varchar(255) COLLATE "C" NOT NULL,
    cycle_id     varchar(36)  NOT NULL,
    participated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (group_id, cycle_id, reference_id)
);
