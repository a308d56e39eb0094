-- `mtool nodes import` is a tracked, resumable job too: its import_jobs row has mode 'nodes',
-- its batches' checkpoints and rejects the same tables as a matches import.
ALTER TABLE import_jobs DROP CONSTRAINT import_jobs_mode_check;
ALTER TABLE import_jobs ADD CONSTRAINT import_jobs_mode_check CHECK (mode IN ('upsert', 'replace', 'nodes'));
