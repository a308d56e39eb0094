-- What an approximate cycle measured of its own recall: the estimate on an independent sample
-- of queries against their exact top K, its 95% lower bound, the target, the search width each
-- plan's calibration chose, and a warning where the target was not reached (calibrate.py).
ALTER TABLE match_cycles ADD COLUMN quality jsonb NOT NULL DEFAULT '{}';
