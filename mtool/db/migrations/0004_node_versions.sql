-- Each group's node version: a number from one sequence, set anew by every statement that
-- inserts, updates or deletes a group's nodes (statement triggers, so any SQL counts, not only
-- `mtool nodes import`). A match cycle records the version it loaded; `mtool match` skips a
-- group whose version, profile and options are those of its last COMPLETED cycle.
CREATE SEQUENCE node_version_seq;
CREATE TABLE node_versions (
    group_id   uuid        PRIMARY KEY,
    version    bigint      NOT NULL,
    changed_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO node_versions (group_id, version) SELECT DISTINCT group_id, nextval('node_version_seq') FROM nodes;

CREATE FUNCTION bump_node_versions() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        UPDATE node_versions SET version = nextval('node_version_seq'), changed_at = now();
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO node_versions (group_id, version)
            SELECT g, nextval('node_version_seq') FROM (SELECT DISTINCT group_id AS g FROM old_rows) d
            ON CONFLICT (group_id) DO UPDATE SET version = EXCLUDED.version, changed_at = now();
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO node_versions (group_id, version)
            SELECT g, nextval('node_version_seq') FROM
                (SELECT group_id AS g FROM new_rows UNION SELECT group_id FROM old_rows) d
            ON CONFLICT (group_id) DO UPDATE SET version = EXCLUDED.version, changed_at = now();
    ELSE
        INSERT INTO node_versions (group_id, version)
            SELECT g, nextval('node_version_seq') FROM (SELECT DISTINCT group_id AS g FROM new_rows) d
            ON CONFLICT (group_id) DO UPDATE SET version = EXCLUDED.version, changed_at = now();
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER nodes_version_insert AFTER INSERT ON nodes REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION bump_node_versions();
CREATE TRIGGER nodes_version_update AFTER UPDATE ON nodes REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION bump_node_versions();
CREATE TRIGGER nodes_version_delete AFTER DELETE ON nodes REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION bump_node_versions();
CREATE TRIGGER nodes_version_truncate AFTER TRUNCATE ON nodes
    FOR EACH STATEMENT EXECUTE FUNCTION bump_node_versions();
