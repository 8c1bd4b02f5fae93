-- Chip locations: summaries, samples of places, and the audit of a split setup.
-- Contract: stacchip_db/locations.py and stacchip_db/audit.py call these functions with named
-- arguments; the `location` column, its index and trigger come from alembic 0008.
--
-- A location is a place on a pixel grid: chips with the same CRS, pixel size, chip size and
-- top-left corner share it, whatever their item or date (stacchip_db/grid.py,
-- `grid_locations`). Every function here takes the selection filters of sql/010 (its filter
-- block, expanded here by `db init`: {{filter_parameters}} and the like) and reads the chips
-- through stacchip.select_chips, so a filter means here what it means everywhere.

CALL stacchip.drop_functions(
    '{location_dates,sample_locations,sample_locations_stratified,audit_split}'
);

-- How many dates the locations of the matching chips have: one row per number of distinct
-- dates (datetimes) a location has, with the number of such locations and their chips.
CREATE FUNCTION stacchip.location_dates(
    {{filter_parameters}}
)
RETURNS TABLE (date_count bigint, location_count bigint, chip_count bigint)
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
    SELECT l.dates, count(*), sum(l.chips)::bigint
    FROM (
        SELECT s.location, count(DISTINCT s.datetime) AS dates, count(*) AS chips
        FROM stacchip.select_chips(
            {{filter_arguments location_dates.}}
        ) AS s
        GROUP BY s.location
    ) AS l
    GROUP BY l.dates
    ORDER BY l.dates
$$;

-- A reproducible sample of `n` locations with all their matching chips (every date, item and
-- collection of the place that passes the filters). The locations are taken in the order of
-- their key from the seed's offset (stacchip.sample_offset) up, then wrapping around from the
-- lowest key, as sample_chips takes chips: the same seed and data give the same places on any
-- server, and a sample of n places is the first n of any larger one. Each leg is an ordered
-- walk of chips_location_idx that stops after n distinct places. Splits apply to a place as
-- to its chips: a place's chips have one footprint, hence one block and one split.
-- Rows: place by place in sampling order, each place's chips by datetime, collection, item.
CREATE FUNCTION stacchip.sample_locations(
    n int,
    seed bigint DEFAULT 0,
    {{filter_parameters}}
)
RETURNS SETOF stacchip.selected_chip
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
    WITH selected AS NOT MATERIALIZED (
        SELECT s AS chip, s.location
        FROM stacchip.select_chips(
            {{filter_arguments sample_locations.}}
        ) AS s
    ),
    up AS MATERIALIZED (
        SELECT DISTINCT location FROM selected
        WHERE location >= stacchip.sample_offset(sample_locations.seed)
        ORDER BY location LIMIT sample_locations.n
    ),
    wrapped AS MATERIALIZED (
        SELECT DISTINCT location FROM selected
        WHERE location < stacchip.sample_offset(sample_locations.seed)
        ORDER BY location
        LIMIT greatest(sample_locations.n - (SELECT count(*) FROM up), 0)
    ),
    chosen AS (
        SELECT 0 AS lap, location FROM up UNION ALL SELECT 1 AS lap, location FROM wrapped
    )
    SELECT (selected.chip).*
    FROM chosen JOIN selected ON selected.location = chosen.location
    ORDER BY chosen.lap, chosen.location, (selected.chip).datetime,
             (selected.chip).collection, (selected.chip).item_id
$$;

-- Stratified samples of places: each stratum present ('collection', or 'cell' with `cell_size`
-- degrees; a place spans dates, so 'year' and 'quarter' do not apply) gives
-- k = ceil(n / strata present) places, or all it has, in the seeded order above; the total is
-- cut to n in the order (rank in stratum, lap, key). By collection the unit is a place within a
-- collection (with that collection's chips). It ranks every matching place (a sort of the
-- filtered set: filter first).
CREATE FUNCTION stacchip.sample_locations_stratified(
    n int,
    seed bigint DEFAULT 0,
    stratify_by text DEFAULT 'collection',
    cell_size float8 DEFAULT 1.0,
    {{filter_parameters}}
)
RETURNS SETOF stacchip.selected_chip
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
    WITH selected AS MATERIALIZED (
        SELECT s AS chip, s.location,
               stacchip.chip_stratum(
                   stacchip.check_choice(sample_locations_stratified.stratify_by,
                                         '{collection,cell}', 'stratify_by of places'),
                   s.collection, s.datetime, s.geometry,
                   sample_locations_stratified.cell_size) AS stratum
        FROM stacchip.select_chips(
            {{filter_arguments sample_locations_stratified.}}
        ) AS s
    ),
    ranked AS (
        SELECT u.stratum, u.location,
               u.location < stacchip.sample_offset(sample_locations_stratified.seed) AS lap,
               row_number() OVER (
                   PARTITION BY u.stratum
                   ORDER BY u.location < stacchip.sample_offset(sample_locations_stratified.seed),
                            u.location) AS rank_in_stratum
        FROM (SELECT DISTINCT stratum, location FROM selected) AS u
    ),
    capped AS (
        SELECT ranked.*, count(*) FILTER (WHERE rank_in_stratum = 1) OVER () AS strata
        FROM ranked WHERE rank_in_stratum <= sample_locations_stratified.n
    ),
    chosen AS (
        SELECT stratum, location, lap, rank_in_stratum FROM capped
        WHERE rank_in_stratum <= ceil(sample_locations_stratified.n::numeric / strata)
        ORDER BY rank_in_stratum, lap, location
        LIMIT greatest(sample_locations_stratified.n, 0)
    )
    SELECT (selected.chip).*
    FROM chosen
    JOIN selected ON selected.stratum = chosen.stratum AND selected.location = chosen.location
    ORDER BY chosen.rank_in_stratum, chosen.lap, chosen.location, chosen.stratum,
             (selected.chip).datetime, (selected.chip).collection, (selected.chip).item_id
$$;

-- The audit of a split setup: the block split (`block_size`, `split_fractions`) of the chips
-- passing the filters (`split_buffer` among them; `split` must be NULL: every split is
-- audited). One row per finding:
--   overlap    pairs of chips of different splits whose footprints share area, and that area
--              (km², on the WGS 84 spheroid). Only a chip whose bounding box reaches into
--              another block (past an edge, not onto it) can share area with a chip of
--              another block: a chip inside its block lies in it, and blocks share no area. So
--              those edge chips are found in one pass and each is looked up against the
--              matching chips through the GiST index; the split of a candidate is that of its
--              block, computed once per block (chip_split hashes with md5 and is not inlined).
--              Cost: a scan of the matching chips plus one index probe per edge chip.
--   locations  places with chips in more than one split: first the places whose chips lie in
--              more than one block (a GROUP BY over the matching chips on two numbers per
--              chip, which spills to disk past work_mem: memory stays bounded), then, for
--              those only, their splits.
--   duplicates chips selected more than once: none by construction (a chip has one split).
CREATE FUNCTION stacchip.audit_split(
    {{filter_parameters}}
)
RETURNS TABLE (finding text, found bigint, area_km2 float8)
LANGUAGE sql STABLE
AS $$
    WITH edge AS MATERIALIZED (
        SELECT s.collection, s.item_id, s.chip_size, s.chip_index_x, s.chip_index_y,
               s.geometry,
               floor((ST_XMin(s.geometry) + ST_XMax(s.geometry)) / 2 / audit_split.block_size)
                   AS bx,
               floor((ST_YMin(s.geometry) + ST_YMax(s.geometry)) / 2 / audit_split.block_size)
                   AS by
        FROM stacchip.select_chips(
            {{filter_arguments audit_split.}}
        ) AS s
        WHERE floor(ST_XMin(s.geometry) / audit_split.block_size)
                  <> ceil(ST_XMax(s.geometry) / audit_split.block_size) - 1
           OR floor(ST_YMin(s.geometry) / audit_split.block_size)
                  <> ceil(ST_YMax(s.geometry) / audit_split.block_size) - 1
    ),
    candidates AS MATERIALIZED (
        SELECT e.collection, e.item_id, e.chip_size, e.chip_index_x, e.chip_index_y,
               e.geometry AS edge_geometry, e.bx AS edge_bx, e.by AS edge_by,
               c.collection AS other_collection, c.item_id AS other_item_id,
               c.chip_size AS other_chip_size, c.chip_index_x AS other_x,
               c.chip_index_y AS other_y, c.geometry AS other_geometry, o.bx, o.by,
               (floor(ST_XMin(c.geometry) / audit_split.block_size)
                    <> ceil(ST_XMax(c.geometry) / audit_split.block_size) - 1
                OR floor(ST_YMin(c.geometry) / audit_split.block_size)
                    <> ceil(ST_YMax(c.geometry) / audit_split.block_size) - 1) AS other_is_edge
        FROM edge AS e
        JOIN stacchip.select_chips(
            {{filter_arguments audit_split.}}
        ) AS c ON ST_Intersects(c.geometry, e.geometry)
        CROSS JOIN LATERAL (
            SELECT floor((ST_XMin(c.geometry) + ST_XMax(c.geometry)) / 2
                         / audit_split.block_size) AS bx,
                   floor((ST_YMin(c.geometry) + ST_YMax(c.geometry)) / 2
                         / audit_split.block_size) AS by
        ) AS o
        WHERE (o.bx, o.by) <> (e.bx, e.by)
    ),
    blocks AS MATERIALIZED (
        SELECT b.bx, b.by, stacchip.chip_split(
                   ST_SetSRID(ST_MakePoint((b.bx + 0.5) * audit_split.block_size,
                                           (b.by + 0.5) * audit_split.block_size), 4326),
                   audit_split.block_size, audit_split.split_fractions) AS split
        FROM (SELECT edge_bx AS bx, edge_by AS by FROM candidates
              UNION SELECT bx, by FROM candidates) AS b
    ),
    pairs AS (
        SELECT ST_Area(ST_Intersection(k.edge_geometry, k.other_geometry)::geography) / 1e6
                   AS km2
        FROM candidates AS k
        JOIN blocks AS eb ON eb.bx = k.edge_bx AND eb.by = k.edge_by
        JOIN blocks AS ob ON ob.bx = k.bx AND ob.by = k.by
        WHERE eb.split <> ob.split
          AND ST_Relate(k.other_geometry, k.edge_geometry, '2********')
          -- each pair once: from its first chip when both are edge chips
          AND (NOT k.other_is_edge
               OR (k.collection, k.item_id, k.chip_size, k.chip_index_x, k.chip_index_y)
                  < (k.other_collection, k.other_item_id, k.other_chip_size, k.other_x,
                     k.other_y))
    ),
    spread AS MATERIALIZED (
        SELECT b.location
        FROM (
            SELECT s.location,
                   floor((ST_XMin(s.geometry) + ST_XMax(s.geometry)) / 2
                         / audit_split.block_size) AS bx,
                   floor((ST_YMin(s.geometry) + ST_YMax(s.geometry)) / 2
                         / audit_split.block_size) AS by
            FROM stacchip.select_chips(
                {{filter_arguments audit_split.}}
            ) AS s
        ) AS b
        GROUP BY b.location
        HAVING min(b.bx) <> max(b.bx) OR min(b.by) <> max(b.by)
    )
    SELECT 'overlap', count(*), coalesce(sum(km2), 0) FROM pairs
    UNION ALL
    SELECT 'locations', count(*), NULL FROM (
        SELECT s.location
        FROM spread
        JOIN stacchip.select_chips(
            {{filter_arguments audit_split.}}
        ) AS s ON s.location = spread.location
        GROUP BY s.location
        HAVING count(DISTINCT stacchip.chip_split(s.geometry, audit_split.block_size,
                                                  audit_split.split_fractions)) > 1
    ) AS split_places
    UNION ALL
    SELECT 'duplicates', 0, NULL
$$;
