-- `/v1/changes?type=` and streams filtered by exact type names read each type's changes
-- in id order from here, however rare the type. Changes of one type are appended at the
-- end of their range, so the index costs few page writes per batch.
CREATE INDEX changes_by_type ON changes (type, id);
