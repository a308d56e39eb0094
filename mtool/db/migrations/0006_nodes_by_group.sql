-- `nodes` partitioned by group, one partition per group (mtool_part.nodes_<group hex>), as
-- potential_matches is: the first import of a group then loads a plain table, builds its key
-- once by sort and attaches it (node_import), where inserting into one shared key put every
-- row at a random place of it (1M nodes with random ids: 14.7-15.7 s of server work against
-- 4.8-6.6 s). A DEFAULT partition takes a new group's rows written by plain SQL; the existing
-- groups each get their own partition here, and the node versions stay as they were.
ALTER TABLE nodes RENAME TO nodes_before_0006;
ALTER TABLE nodes_before_0006 RENAME CONSTRAINT nodes_pkey TO nodes_before_0006_pkey;
ALTER INDEX nodes_domain RENAME TO nodes_before_0006_domain;

CREATE TABLE nodes (LIKE nodes_before_0006 INCLUDING DEFAULTS) PARTITION BY LIST (group_id);
ALTER TABLE nodes ADD PRIMARY KEY (group_id, reference_id);
CREATE INDEX nodes_domain ON nodes (domain_id, group_id);

DO $$
DECLARE g uuid;
BEGIN
    FOR g IN SELECT DISTINCT group_id FROM nodes_before_0006 LOOP
        EXECUTE format('CREATE TABLE mtool_part.%I PARTITION OF nodes FOR VALUES IN (%L)',
                       'nodes_' || replace(g::text, '-', ''), g);
    END LOOP;
END $$;
CREATE TABLE mtool_part.nodes_default PARTITION OF nodes DEFAULT;
INSERT INTO nodes SELECT * FROM nodes_before_0006;
DROP TABLE nodes_before_0006;  -- with its version triggers, made again below on the new table

CREATE TRIGGER nodes_version_insert AFTER INSERT ON nodes REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION bump_node_versions();
CREATE TRIGGER nodes_version_update AFTER UPDATE ON nodes REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION bump_node_versions();
CREATE TRIGGER nodes_version_delete AFTER DELETE ON nodes REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION bump_node_versions();
CREATE TRIGGER nodes_version_truncate AFTER TRUNCATE ON nodes
    FOR EACH STATEMENT EXECUTE FUNCTION bump_node_versions();
