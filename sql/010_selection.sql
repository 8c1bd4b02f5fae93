-- Chip selection, seeded sampling and spatial-block splits, callable from psql, QGIS or Python.
-- Contract: stacchip_db/selection.py builds calls to these functions (its named arguments are
-- these parameter names; it reads the filters' names and types from the filter block below);
-- the sampling key is the column stacchip.chips.sample_key (alembic 0008: stored, the value of
-- 0003's stacchip.chip_sample_key), indexed per partition alone and after year/quarter.
--
-- This file is a template: `db init` expands its double-brace markers before running it
-- (stacchip_db/db/sql_template.py), so that the filter parameters, which every selection
-- function takes by name, are written once, in the filter block.
--
-- The set-returning functions are single-SELECT `LANGUAGE sql STABLE` functions so PostgreSQL
-- inlines them into the calling query: with constant arguments, unused filters fold away and the
-- remaining ones use the indexes (the (geometry, datetime) GiST, btree on datetime, the
-- sampling-key indexes).
-- Keep them inlinable: no STRICT, no SECURITY DEFINER, no SET clauses, one SELECT.
-- Calendar fields (month, quarter, year) are taken in UTC, whatever the session's TimeZone.

-- `value` when it is NULL or one of `allowed`, else an error naming `what`. IMMUTABLE so that a
-- constant argument is checked once, when the query is planned.
CREATE OR REPLACE FUNCTION stacchip.check_choice(value text, allowed text[], what text)
RETURNS text
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
AS $$
BEGIN
    IF value IS NOT NULL AND NOT value = ANY (allowed) THEN
        RAISE EXCEPTION '% must be one of %, not %', what, array_to_string(allowed, ', '),
            quote_literal(value) USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN value;
END
$$;

-- The spatial block of a chip: the cell of a `block_size`-degree grid holding the centre of the
-- footprint's bounding box, as 'bx,by' (cell indices, west-south origin at lon 0, lat 0).
CREATE OR REPLACE FUNCTION stacchip.chip_block(footprint geometry, block_size float8 DEFAULT 1.0)
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT floor((ST_XMin(footprint) + ST_XMax(footprint)) / 2 / block_size)::bigint::text
        || ',' || floor((ST_YMin(footprint) + ST_YMax(footprint)) / 2 / block_size)::bigint::text
$$;

-- 'train', 'val' or 'test' for a chip, by its block alone: md5 of the block id gives a uniform
-- number in [0, 1) that is compared with the cumulative fractions (normalised to sum to 1).
-- Depends on nothing but the footprint, so adding items never moves a chip to another split.
CREATE OR REPLACE FUNCTION stacchip.chip_split(
    footprint geometry,
    block_size float8 DEFAULT 1.0,
    fractions float8[] DEFAULT '{0.8,0.1,0.1}'
)
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE
        WHEN u < fractions[1] / (fractions[1] + fractions[2] + fractions[3]) THEN 'train'
        WHEN u < (fractions[1] + fractions[2]) / (fractions[1] + fractions[2] + fractions[3])
            THEN 'val'
        ELSE 'test'
    END
    FROM (
        SELECT ('x' || substr(md5('block|' || stacchip.chip_block(footprint, block_size)), 1, 8))
            ::bit(32)::bigint / 4294967296.0 AS u
    ) AS h
$$;

-- Whether the footprint, grown by `buffer` degrees, stays inside one block: chips for which
-- this is false straddle a block edge and may overlap chips of a neighbouring block.
CREATE OR REPLACE FUNCTION stacchip.chip_inside_block(
    footprint geometry, block_size float8 DEFAULT 1.0, buffer float8 DEFAULT 0
)
RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT floor((ST_XMin(footprint) - buffer) / block_size)
             = floor((ST_XMax(footprint) + buffer) / block_size)
       AND floor((ST_YMin(footprint) - buffer) / block_size)
             = floor((ST_YMax(footprint) + buffer) / block_size)
$$;

-- The stratum of a chip for stratified sampling: its collection, its year ('2021'), its quarter
-- ('2021-Q3') or the `cell_size`-degree cell holding its footprint's centre ('bx,by').
CREATE OR REPLACE FUNCTION stacchip.chip_stratum(
    stratify_by text,
    collection text,
    datetime timestamptz,
    footprint geometry,
    cell_size float8 DEFAULT 1.0
)
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE stacchip.check_choice(
            stratify_by, '{collection,year,quarter,cell}', 'stratify_by')
        WHEN 'collection' THEN collection
        WHEN 'year' THEN extract(year FROM datetime AT TIME ZONE 'UTC')::int::text
        WHEN 'quarter' THEN extract(year FROM datetime AT TIME ZONE 'UTC')::int::text
            || '-Q' || extract(quarter FROM datetime AT TIME ZONE 'UTC')::int::text
        WHEN 'cell' THEN stacchip.chip_block(footprint, cell_size)
    END
$$;

-- Where a seed starts in the sampling-key order: the first 64 bits of md5 of the seed.
CREATE OR REPLACE FUNCTION stacchip.sample_offset(seed bigint)
RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT ('x' || substr(md5('seed|' || seed::text), 1, 16))::bit(64)::bigint $$;

-- A geometry in EPSG:4326 (a geometry without SRID is taken to be lon/lat already).
CREATE OR REPLACE FUNCTION stacchip.as_lonlat(g geometry)
RETURNS geometry
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE WHEN ST_SRID(g) = 0 THEN ST_SetSRID(g, 4326)
                WHEN ST_SRID(g) = 4326 THEN g
                ELSE ST_Transform(g, 4326) END
$$;

-- The filters of every selection function, in call order, each `name type DEFAULT value` (all
-- optional: NULL = no filter). Written only here: the markers below expand to
--   filter_parameters     these declarations, in a function's parameter list;
--   filter_arguments P    `collections => P…, bbox => P…`: P a function name and a dot (passing
--                         its own parameters on by name) or `$N` (numbered from N);
--   filter_values         `collections, bbox, …` (a PL/pgSQL USING list, by position).
-- A new filter is a line here and its condition in matching_chips (and a ChipFilter field).
-- Bounds: start_time <= datetime < end_time; bbox is {minx, miny, maxx, maxy} in degrees;
-- months 1-12; quarters 1-4; max_cloud and max_nodata are fractions 0..1. With `split`, only
-- chips of that split by spatial block (`block_size` degrees, `split_fractions`); with
-- `split_buffer` (degrees, 0 = strict), only chips whose footprint grown by it stays inside its
-- block, so no footprint of one split overlaps a block of another. `within` ({layer} or
-- {layer, column, value}): only chips intersecting that vector layer's (matching) features;
-- `min_fractions` ({"layer": {"class": fraction}}): only chips with at least that share of each
-- class of a raster layer (sql/005_layer_filters.sql, alembic 0009).
{{filters}}
    collections text[] DEFAULT NULL,
    bbox float8[] DEFAULT NULL,
    intersects geometry DEFAULT NULL,
    start_time timestamptz DEFAULT NULL,
    end_time timestamptz DEFAULT NULL,
    months int[] DEFAULT NULL,
    quarters int[] DEFAULT NULL,
    max_cloud real DEFAULT NULL,
    max_nodata real DEFAULT NULL,
    chip_size int DEFAULT NULL,
    split text DEFAULT NULL,
    block_size float8 DEFAULT 1.0,
    split_fractions float8[] DEFAULT '{0.8,0.1,0.1}',
    split_buffer float8 DEFAULT NULL,
    within text[] DEFAULT NULL,
    min_fractions jsonb DEFAULT NULL
{{end filters}}

-- Every version of the selection functions goes first, whatever its parameters (a filter added
-- or removed changes the signature: sql/003), and any other function returning the row type
-- (sql/030's layer sampler), which would otherwise keep the type below from being dropped.
CALL stacchip.drop_functions(
    '{matching_chips,select_chips,sample_chips,sample_chips_stratified,'
    'sample_chips_stratified_run}',
    'stacchip.selected_chip'
);

-- The row of every selection function: the chip's columns, its id first. (A type of its own,
-- so that the functions do not each spell out the columns.) `geometry` without a typmod, as
-- the former RETURNS TABLE gave it (function results keep none): clients see the same columns.
DROP TYPE IF EXISTS stacchip.selected_chip;
CREATE TYPE stacchip.selected_chip AS (
    chip_id text,
    collection text,
    item_id text,
    chip_size int,
    chip_index_x int,
    chip_index_y int,
    datetime timestamptz,
    cloud_fraction real,
    nodata_fraction real,
    geometry geometry,
    location bigint  -- last: `SELECT *` callers keep their column positions
);

-- The rows of stacchip.chips matching every given filter (see the filter block), whole: the
-- samples order them by their stored `sample_key`, which the planner then sees as the column
-- its indexes hold.
CREATE FUNCTION stacchip.matching_chips(
    {{filter_parameters}}
)
RETURNS SETOF stacchip.chips
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
    SELECT c.*
    FROM stacchip.chips AS c
    WHERE (matching_chips.collections IS NULL OR c.collection = ANY (matching_chips.collections))
      AND (matching_chips.bbox IS NULL OR ST_Intersects(c.geometry, ST_MakeEnvelope(
            matching_chips.bbox[1], matching_chips.bbox[2], matching_chips.bbox[3],
            matching_chips.bbox[4], 4326)))
      AND (matching_chips.intersects IS NULL
           OR ST_Intersects(c.geometry, stacchip.as_lonlat(matching_chips.intersects)))
      AND (matching_chips.start_time IS NULL OR c.datetime >= matching_chips.start_time)
      AND (matching_chips.end_time IS NULL OR c.datetime < matching_chips.end_time)
      AND (matching_chips.months IS NULL
           OR extract(month FROM c.datetime AT TIME ZONE 'UTC')::int
              = ANY (matching_chips.months))
      AND (matching_chips.quarters IS NULL
           OR extract(quarter FROM c.datetime AT TIME ZONE 'UTC')::int
              = ANY (matching_chips.quarters))
      AND (matching_chips.max_cloud IS NULL OR c.cloud_fraction <= matching_chips.max_cloud)
      AND (matching_chips.max_nodata IS NULL OR c.nodata_fraction <= matching_chips.max_nodata)
      AND (matching_chips.chip_size IS NULL OR c.chip_size = matching_chips.chip_size)
      AND (matching_chips.split IS NULL OR stacchip.chip_split(
            c.geometry, matching_chips.block_size, matching_chips.split_fractions)
            = stacchip.check_choice(matching_chips.split, '{train,val,test}', 'split'))
      AND (matching_chips.split_buffer IS NULL OR stacchip.chip_inside_block(
            c.geometry, matching_chips.block_size, matching_chips.split_buffer))
      -- Scalar subqueries: computed once per query, and the geometry searched with the GiST.
      AND (matching_chips.within IS NULL OR ST_Intersects(
            c.geometry, (SELECT stacchip.layer_geometry(matching_chips.within))))
      AND (matching_chips.min_fractions IS NULL OR NOT EXISTS (
            SELECT 1
            FROM jsonb_each((SELECT stacchip.checked_min_fractions(matching_chips.min_fractions)))
                 AS wanted (layer, thresholds)
            WHERE NOT EXISTS (
                SELECT 1 FROM stacchip.chip_classes AS f
                WHERE f.layer = wanted.layer AND f.collection = c.collection
                  AND f.item_id = c.item_id AND f.chip_size = c.chip_size
                  AND f.chip_index_x = c.chip_index_x AND f.chip_index_y = c.chip_index_y
                  AND NOT EXISTS (
                      SELECT 1 FROM jsonb_each_text(wanted.thresholds) AS t (class, fraction)
                      WHERE coalesce((f.fractions ->> t.class)::real, 0) < t.fraction::real))))
$$;

-- The chips matching every given filter (see the filter block).
CREATE FUNCTION stacchip.select_chips(
    {{filter_parameters}}
)
RETURNS SETOF stacchip.selected_chip
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
    SELECT stacchip.chip_id(c.item_id, c.chip_index_x, c.chip_index_y),
           c.collection, c.item_id, c.chip_size, c.chip_index_x, c.chip_index_y,
           c.datetime, c.cloud_fraction, c.nodata_fraction, c.geometry, c.location
    FROM stacchip.matching_chips(
        {{filter_arguments select_chips.}}
    ) AS c
$$;

-- A reproducible sample of `n` chips, without replacement, from those `select_chips` returns
-- with the same filters. Chips are taken in the order of their sampling key (`sample_key`: 0003's
-- stacchip.chip_sample_key of the chip key) from the seed's offset up, then wrapping around
-- from the lowest key: the same seed and data give the same chips on any server. Each
-- leg is an ordered walk of the sampling-key index that stops after the chips it needs, so the
-- cost grows with n / (fraction of chips passing the filters), not with the table. Rows come
-- in sampling order; a sample of n is the first n chips of any larger sample with that seed.
CREATE FUNCTION stacchip.sample_chips(
    n int,
    seed bigint DEFAULT 0,
    {{filter_parameters}}
)
RETURNS SETOF stacchip.selected_chip
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
    WITH selected AS NOT MATERIALIZED (
        SELECT ROW(stacchip.chip_id(s.item_id, s.chip_index_x, s.chip_index_y), s.collection,
                   s.item_id, s.chip_size, s.chip_index_x, s.chip_index_y, s.datetime,
                   s.cloud_fraction, s.nodata_fraction, s.geometry,
                   s.location)::stacchip.selected_chip
                   AS chip,
               s.sample_key
        FROM stacchip.matching_chips(
            {{filter_arguments sample_chips.}}
        ) AS s
    ),
    from_offset AS MATERIALIZED (
        SELECT 0 AS lap, * FROM selected
        WHERE sample_key >= stacchip.sample_offset(sample_chips.seed)
        ORDER BY sample_key LIMIT sample_chips.n
    ),
    -- Only as many as the first leg missed (LIMIT 0 does not even start the walk).
    wrapped AS (
        SELECT 1 AS lap, * FROM selected
        WHERE sample_key < stacchip.sample_offset(sample_chips.seed)
        ORDER BY sample_key
        LIMIT greatest(sample_chips.n - (SELECT count(*) FROM from_offset), 0)
    )
    SELECT (chosen.chip).*
    FROM (SELECT * FROM from_offset UNION ALL SELECT * FROM wrapped) AS chosen
    ORDER BY chosen.lap, chosen.sample_key
$$;

-- The two legs of one stratum's seeded walk (the stratified samplers here and in sql/030) as CTEs `up_I` and `wrapped_I` (columns lap,
-- chip, sample_key): its first `lim` chips from the seed's offset ($1) up, then (only as many
-- as are missing; LIMIT 0 does not start the walk) from the lowest key. No trailing comma.
CREATE OR REPLACE FUNCTION stacchip.seeded_walk_legs(i int, query text, lim text)
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT format(
        $q$
        up_%1$s AS MATERIALIZED (
            SELECT 0 AS lap, u.* FROM (%2$s) AS u
            WHERE u.sample_key >= $1 ORDER BY u.sample_key LIMIT %3$s
        ),
        wrapped_%1$s AS MATERIALIZED (
            SELECT 1 AS lap, u.* FROM (%2$s) AS u
            WHERE u.sample_key < $1 ORDER BY u.sample_key
            LIMIT greatest(%3$s - (SELECT count(*) FROM up_%1$s), 0)
        )
        $q$, i, query, lim)
$$;

-- Stratified sampling: each stratum present (`stratify_by` 'collection', 'year', 'quarter', or
-- 'cell' with `cell_size` degrees, see stacchip.chip_stratum; NULL = one stratum) gives the same
-- number of chips, k = ceil(n / strata present), or all it has when fewer (no redistribution).
-- A stratum's chips are its first k matching chips in the seeded order of `sample_chips` (from
-- the seed's offset up in sampling-key order, then wrapping around): a stratum's share is the
-- plain sample of that stratum. When the strata give more than n, the total is cut to n in the
-- order (rank in stratum, lap, sampling key), so strata then differ by at most one chip; rows
-- come in that order. Same seed + same data = same chips on any server.
--
-- How: PL/pgSQL (so it is not inlined), running inlinable queries with the arguments as one-shot
-- parameters, so unset filters still fold away. It lists candidate strata cheaply (the given
-- collections or a skip scan of the primary key; the quarters between the first and last chip
-- within the time filter, less those the months/quarters filters exclude), keeps those with a
-- matching chip (one EXISTS each), then takes each stratum's first k with a LIMIT k query whose
-- plan PostgreSQL chooses: an ordered walk of the (year|quarter, sample_key) index, or for a
-- collection of its partition's sample_key index (alembic 0008), that stops after k matches, or a bitmap scan of the few chips matching a narrow
-- filter (bitmap scans are switched off for the call when the planner expects >= 4n matching
-- chips: PostGIS' function costs make it overrate them). Cost then grows with k / (share of
-- the stratum passing the filters), not with the matching set. 'cell' strata cannot be listed
-- without reading the chips, so they rank every matching chip (a sort of the filtered set:
-- filter first). The work is `sample_chips_stratified_run`; `sample_chips_stratified` is the
-- SQL wrapper users call.
CREATE FUNCTION stacchip.sample_chips_stratified_run(
    n int,
    seed bigint DEFAULT 0,
    stratify_by text DEFAULT 'collection',
    cell_size float8 DEFAULT 1.0,
    {{filter_parameters}}
)
RETURNS SETOF stacchip.selected_chip
LANGUAGE plpgsql VOLATILE PARALLEL RESTRICTED
-- The filters' PostGIS costs make every plan look expensive enough to compile; it never pays.
SET jit = off
AS $fn$
DECLARE
    -- Every dynamic query below is run with the same parameters (`USING start_key, k, n,
    -- cell_size, <the filters>`): $1 the seed's offset, $2 k, $3 n, $4 cell_size, and from $5
    -- the filters, so that the numbers do not move when a filter is added.
    start_key constant bigint := stacchip.sample_offset(seed);
    matching constant text := 'SELECT ROW(stacchip.chip_id(s.item_id, s.chip_index_x, '
        's.chip_index_y), s.collection, s.item_id, s.chip_size, s.chip_index_x, '
        's.chip_index_y, s.datetime, s.cloud_fraction, s.nodata_fraction, s.geometry, '
        's.location)'
        '::stacchip.selected_chip AS chip, s.sample_key '
        'FROM stacchip.matching_chips({{filter_arguments $5}}) AS s';
    candidates text[] := '{}';  -- per candidate stratum: a query of its matching chips, keyed
    present text[] := '{}';
    first_time timestamptz;
    last_time timestamptz;
    quarter_start timestamp;
    arms text[];
    found boolean;
    k int;
    legs text := '';
    strata text := '';
    i int;
    plan json;
    bitmaps text;
BEGIN
    PERFORM stacchip.check_choice(stratify_by, '{collection,year,quarter,cell}', 'stratify_by');
    IF n IS NULL OR n <= 0 THEN
        RETURN;
    END IF;

    IF stratify_by = 'cell' THEN
        RETURN QUERY EXECUTE format(
            $q$
            WITH ranked AS (
                SELECT m.*, row_number() OVER (
                    PARTITION BY m.stratum ORDER BY m.sample_key < $1, m.sample_key
                ) AS rank_in_stratum
                FROM (SELECT k.*, stacchip.chip_block((k.chip).geometry, $4) AS stratum
                      FROM (%s OFFSET 0) AS k) AS m
            ),
            capped AS (
                SELECT ranked.*, count(*) FILTER (WHERE rank_in_stratum = 1) OVER () AS strata
                FROM ranked WHERE rank_in_stratum <= $3
            )
            SELECT (capped.chip).* FROM capped
            WHERE rank_in_stratum <= ceil($3::numeric / strata)
            ORDER BY rank_in_stratum, sample_key < $1, sample_key
            LIMIT $3
            $q$, matching)
        USING start_key, k, n, cell_size, {{filter_values}};
        RETURN;
    END IF;

    IF stratify_by IS NULL THEN
        candidates := ARRAY[matching];
    ELSIF stratify_by = 'collection' THEN
        IF collections IS NOT NULL THEN
            SELECT coalesce(array_agg(format('%s WHERE s.collection = %L', matching, c)
                                      ORDER BY c), '{}')
            INTO candidates
            FROM (SELECT DISTINCT c FROM unnest(collections) AS c WHERE c IS NOT NULL) AS d;
        ELSE
            -- The distinct collections by a skip scan of the primary key.
            EXECUTE $q$
                WITH RECURSIVE walk AS (
                    SELECT min(c.collection) AS c FROM stacchip.chips AS c
                    UNION ALL
                    SELECT (SELECT min(c.collection) FROM stacchip.chips AS c
                            WHERE c.collection > walk.c)
                    FROM walk WHERE walk.c IS NOT NULL
                )
                SELECT coalesce(array_agg(format('%s WHERE s.collection = %L', $1, c)
                                          ORDER BY c), '{}')
                FROM walk WHERE c IS NOT NULL
            $q$ INTO candidates USING matching;
        END IF;
    ELSE
        -- Quarters (UTC) from the first to the last chip within the time filter.
        EXECUTE 'SELECT min(c.datetime), max(c.datetime) FROM stacchip.chips AS c '
                'WHERE ($1::timestamptz IS NULL OR c.datetime >= $1) '
                'AND ($2::timestamptz IS NULL OR c.datetime < $2)'
            INTO first_time, last_time USING start_time, end_time;
        IF first_time IS NULL THEN
            RETURN;
        END IF;
        quarter_start := date_trunc('year', first_time AT TIME ZONE 'UTC');
        arms := '{}';
        WHILE quarter_start <= last_time AT TIME ZONE 'UTC' LOOP
            IF (quarters IS NULL OR extract(quarter FROM quarter_start)::int = ANY (quarters))
               AND (months IS NULL OR EXISTS (
                    SELECT 1 FROM unnest(months) AS m
                    WHERE (m - 1) / 3 + 1 = extract(quarter FROM quarter_start)::int))
               AND quarter_start >= date_trunc('quarter', first_time AT TIME ZONE 'UTC')
            THEN
                arms := arms || format(
                    '%s WHERE date_trunc(%L, s.datetime AT TIME ZONE ''UTC'') '
                    '= make_timestamp(%s, %s, 1, 0, 0, 0)', matching, stratify_by,
                    extract(year FROM quarter_start)::int,
                    CASE WHEN stratify_by = 'year' THEN 1
                         ELSE extract(month FROM quarter_start)::int END);
            END IF;
            quarter_start := quarter_start + interval '3 months';
        END LOOP;
        -- A year is one stratum however many of its quarters are left.
        SELECT coalesce(array_agg(DISTINCT a), '{}') INTO candidates FROM unnest(arms) AS a;
    END IF;

    -- When the planner expects a stratum to hold many times k matching chips, walk its
    -- (stratum, key) index and stop after k: PostGIS' high function costs make it overrate a
    -- bitmap scan that reads every matching chip. Otherwise leave the choice to it.
    EXECUTE 'EXPLAIN (FORMAT JSON) ' || matching INTO plan
        USING start_key, k, n, cell_size, {{filter_values}};
    bitmaps := current_setting('enable_bitmapscan');
    IF (plan -> 0 -> 'Plan' ->> 'Plan Rows')::float8 >= 4.0 * n THEN
        PERFORM set_config('enable_bitmapscan', 'off', true);
    END IF;

    -- The strata present: those with at least one matching chip.
    FOR i IN 1 .. coalesce(cardinality(candidates), 0) LOOP
        EXECUTE format('SELECT EXISTS (%s)', candidates[i]) INTO found
            USING start_key, k, n, cell_size, {{filter_values}};
        IF found THEN
            present := present || candidates[i];
        END IF;
    END LOOP;
    IF cardinality(present) = 0 THEN
        PERFORM set_config('enable_bitmapscan', bitmaps, true);
        RETURN;
    END IF;
    k := ceil(n::numeric / cardinality(present));


    -- Per stratum: its first k from the offset up, then (only if it has fewer) from the lowest
    -- key.
    FOR i IN 1 .. cardinality(present) LOOP
        legs := legs || stacchip.seeded_walk_legs(i, present[i], '$2') || ',';
        strata := strata || CASE WHEN i > 1 THEN ' UNION ALL ' ELSE '' END || format(
            'SELECT %1$s AS stratum, * FROM up_%1$s UNION ALL SELECT %1$s, * FROM wrapped_%1$s',
            i);
    END LOOP;
    RETURN QUERY EXECUTE format(
        $q$
        WITH %s
        ranked AS (
            SELECT t.*, row_number() OVER (
                PARTITION BY t.stratum ORDER BY t.lap, t.sample_key) AS rank_in_stratum
            FROM (%s) AS t
        )
        SELECT (ranked.chip).* FROM ranked ORDER BY rank_in_stratum, lap, sample_key LIMIT $3
        $q$, legs, strata)
    USING start_key, k, n, cell_size, {{filter_values}};
    PERFORM set_config('enable_bitmapscan', bitmaps, true);
END
$fn$;

CREATE FUNCTION stacchip.sample_chips_stratified(
    n int,
    seed bigint DEFAULT 0,
    stratify_by text DEFAULT 'collection',
    cell_size float8 DEFAULT 1.0,
    {{filter_parameters}}
)
RETURNS SETOF stacchip.selected_chip
LANGUAGE sql STABLE
AS $$
    SELECT * FROM stacchip.sample_chips_stratified_run(
        n, seed, stratify_by, cell_size, {{filter_values}})
$$;
