-- A cycle records what it computes from (fingerprint of its nodes, profile and options), so a
-- run resumes an unfinished cycle only when its inputs are the same; other unfinished cycles
-- are ABANDONED. A cycle that found no edge is SKIPPED and does not replace the group's matches.
ALTER TABLE match_cycles ADD COLUMN fingerprint text;
ALTER TABLE match_cycles ADD COLUMN inputs jsonb NOT NULL DEFAULT '{}';
ALTER TABLE match_cycles DROP CONSTRAINT match_cycles_status_check;
ALTER TABLE match_cycles ADD CONSTRAINT match_cycles_status_check
    CHECK (status IN ('PENDING', 'PROCESSING', 'COMPLETED', 'FAILED', 'SKIPPED', 'ABANDONED'));
