-- Numeric queryables for pgstac (contract: docs/architecture.md, "Database contract",
-- "Queryables").
-- pgstac sorts a property with no queryable entry as text, so "least cloudy" by
-- eo:cloud_cover would put 16.8 before 9.6. Registering a to_float wrapper makes sorting and
-- comparisons numeric, for our searches and for any pgstac client of this database.
-- upsert_queryable replaces a conflicting entry, so applying this file twice changes nothing.
SELECT pgstac.upsert_queryable(
    q.name, q.definition::jsonb, 'to_float', 'BTREE', NULL, NULL
)
FROM (VALUES
    ('eo:cloud_cover', '{"type": "number", "minimum": 0, "maximum": 100}'),
    ('s2:nodata_pixel_percentage', '{"type": "number", "minimum": 0, "maximum": 100}'),
    ('landsat:cloud_cover_land', '{"type": "number"}')
) AS q (name, definition)
WHERE NOT EXISTS (
    SELECT 1 FROM pgstac.queryables existing
    WHERE existing.name = q.name
      AND existing.property_wrapper = 'to_float'
      AND existing.collection_ids IS NULL
);
