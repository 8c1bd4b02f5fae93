-- Chip locations: summaries, samples of places, and the audit of a split setup.
-- Contract: stacchip_db/locations.py and stacchip_db/audit.py call these functions with named
-- arguments; the `location` column, its index and trigger come from alembic 0008.
--
-- A location is a place on a pixel grid: chips with the same CRS, pixel size, chip size and
-- top-left corner share it, whatever their item or date (stacchip_db/grid.py,
-- `grid_locations`). Every function here takes the selection filters of sql/010 (its filter
-- block, expanded here by `db init`: {{filter_parameters}} and the like) and reads the chips
-- through stacchip.select_chips, so a filter means here what it means everywhere.

DO $$
DECLARE
    old regprocedure;
BEGIN
    FOR old IN
        SELECT p.oid FROM pg_proc AS p
        WHERE p.pronamespace = 'stacchip'::regnamespace
          AND p.proname IN ('location_dates', 'sample_locations', 'sample_locations_stratified',
                            'audit_split')
    LOOP
        EXECUTE format('DROP FUNCTION %s', old);
    END LOOP;
END
$$;

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
--              (km², on the WGS 84 spheroid). Only a chip crossing a block edge can overlap a
--              chip of another block (a chip inside its block lies in it, and blocks share no
--              area), so those chips are found in one pass, each looked up against the
--              matching chips through the GiST index: the cost is a scan of the matching
--              chips plus one index probe per edge chip.
--   locations  places with chips in more than one split (a GROUP BY over the matching chips,
--              which spills to disk past work_mem: memory stays bounded).
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
               stacchip.chip_split(s.geometry, audit_split.block_size,
                                   audit_split.split_fractions) AS split
        FROM stacchip.select_chips(
            {{filter_arguments audit_split.}}
        ) AS s
        WHERE NOT stacchip.chip_inside_block(s.geometry, audit_split.block_size, 0)
    ),
    pairs AS (
        SELECT ST_Area(ST_Intersection(e.geometry, c.geometry)::geography) / 1e6 AS km2
        FROM edge AS e
        JOIN stacchip.select_chips(
            {{filter_arguments audit_split.}}
        ) AS c ON ST_Intersects(c.geometry, e.geometry)
        WHERE stacchip.chip_split(c.geometry, audit_split.block_size,
                                  audit_split.split_fractions) <> e.split
          AND ST_Relate(c.geometry, e.geometry, '2********')
          -- each pair once: from its first chip when both cross an edge
          AND (stacchip.chip_inside_block(c.geometry, audit_split.block_size, 0)
               OR (e.collection, e.item_id, e.chip_size, e.chip_index_x, e.chip_index_y)
                  < (c.collection, c.item_id, c.chip_size, c.chip_index_x, c.chip_index_y))
    )
    SELECT 'overlap', count(*), coalesce(sum(km2), 0) FROM pairs
    UNION ALL
    SELECT 'locations', count(*), NULL FROM (
        SELECT s.location
        FROM stacchip.select_chips(
            {{filter_arguments audit_split.}}
        ) AS s
        GROUP BY s.location
        HAVING min(stacchip.chip_split(s.geometry, audit_split.block_size,
                                       audit_split.split_fractions))
            <> max(stacchip.chip_split(s.geometry, audit_split.block_size,
                                       audit_split.split_fractions))
    ) AS spread
    UNION ALL
    SELECT 'duplicates', 0, NULL
$$;
