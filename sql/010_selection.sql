-- Chip selection, seeded sampling and spatial-block splits, callable from psql, QGIS or Python.
-- Contract: stacchip_db/selection.py builds calls to these functions (its named arguments are
-- these parameter names); stacchip.chip_sample_key and its index come from alembic 0003.
--
-- The set-returning functions are single-SELECT `LANGUAGE sql STABLE` functions so PostgreSQL
-- inlines them into the calling query: with constant arguments, unused filters fold away and the
-- remaining ones use the indexes (GiST on geometry, btree on datetime, the sampling-key index).
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

-- The chips matching every given filter (NULL = no filter). Bounds: start_time <= datetime <
-- end_time; bbox is {minx, miny, maxx, maxy} in degrees; months 1-12; quarters 1-4; max_cloud
-- and max_nodata are fractions 0..1. With `split`, only chips of that split by spatial block;
-- with `split_buffer` (degrees, 0 = strict), only chips whose footprint grown by it stays inside
-- its block, so no footprint of one split overlaps a block of another.
DROP FUNCTION IF EXISTS stacchip.select_chips(
    text[], float8[], geometry, timestamptz, timestamptz, int[], int[], real, real, int, text,
    float8, float8[], float8
);
CREATE FUNCTION stacchip.select_chips(
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
    split_buffer float8 DEFAULT NULL
)
RETURNS TABLE (
    chip_id text,
    collection text,
    item_id text,
    chip_size int,
    chip_index_x int,
    chip_index_y int,
    datetime timestamptz,
    cloud_fraction real,
    nodata_fraction real,
    geometry geometry(Polygon, 4326)
)
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
    SELECT stacchip.chip_id(c.item_id, c.chip_index_x, c.chip_index_y),
           c.collection, c.item_id, c.chip_size, c.chip_index_x, c.chip_index_y,
           c.datetime, c.cloud_fraction, c.nodata_fraction, c.geometry
    FROM stacchip.chips AS c
    WHERE (select_chips.collections IS NULL OR c.collection = ANY (select_chips.collections))
      AND (select_chips.bbox IS NULL OR ST_Intersects(c.geometry, ST_MakeEnvelope(
            select_chips.bbox[1], select_chips.bbox[2], select_chips.bbox[3],
            select_chips.bbox[4], 4326)))
      AND (select_chips.intersects IS NULL
           OR ST_Intersects(c.geometry, stacchip.as_lonlat(select_chips.intersects)))
      AND (select_chips.start_time IS NULL OR c.datetime >= select_chips.start_time)
      AND (select_chips.end_time IS NULL OR c.datetime < select_chips.end_time)
      AND (select_chips.months IS NULL
           OR extract(month FROM c.datetime AT TIME ZONE 'UTC')::int
              = ANY (select_chips.months))
      AND (select_chips.quarters IS NULL
           OR extract(quarter FROM c.datetime AT TIME ZONE 'UTC')::int
              = ANY (select_chips.quarters))
      AND (select_chips.max_cloud IS NULL OR c.cloud_fraction <= select_chips.max_cloud)
      AND (select_chips.max_nodata IS NULL OR c.nodata_fraction <= select_chips.max_nodata)
      AND (select_chips.chip_size IS NULL OR c.chip_size = select_chips.chip_size)
      AND (select_chips.split IS NULL OR stacchip.chip_split(
            c.geometry, select_chips.block_size, select_chips.split_fractions)
            = stacchip.check_choice(select_chips.split, '{train,val,test}', 'split'))
      AND (select_chips.split_buffer IS NULL OR stacchip.chip_inside_block(
            c.geometry, select_chips.block_size, select_chips.split_buffer))
$$;

-- A reproducible sample of `n` chips, without replacement, from those `select_chips` returns
-- with the same filters. Chips are taken in the order of their sampling key (alembic 0003's
-- stacchip.chip_sample_key, a hash of the chip key) from the seed's offset up, then wrapping
-- around from the lowest key: the same seed and data give the same chips on any server. Each
-- leg is an ordered walk of the sampling-key index that stops after the chips it needs, so the
-- cost grows with n / (fraction of chips passing the filters), not with the table. Rows come
-- in sampling order; a sample of n is the first n chips of any larger sample with that seed.
DROP FUNCTION IF EXISTS stacchip.sample_chips(
    int, bigint, text[], float8[], geometry, timestamptz, timestamptz, int[], int[], real, real, int, text,
    float8, float8[], float8
);
CREATE FUNCTION stacchip.sample_chips(
    n int,
    seed bigint DEFAULT 0,
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
    split_buffer float8 DEFAULT NULL
)
RETURNS TABLE (
    chip_id text,
    collection text,
    item_id text,
    chip_size int,
    chip_index_x int,
    chip_index_y int,
    datetime timestamptz,
    cloud_fraction real,
    nodata_fraction real,
    geometry geometry(Polygon, 4326)
)
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
    WITH selected AS NOT MATERIALIZED (
        SELECT s.*,
               stacchip.chip_sample_key(s.collection, s.item_id, s.chip_size,
                                        s.chip_index_x, s.chip_index_y) AS sample_key
        FROM stacchip.select_chips(
            collections => sample_chips.collections, bbox => sample_chips.bbox,
            intersects => sample_chips.intersects, start_time => sample_chips.start_time,
            end_time => sample_chips.end_time, months => sample_chips.months,
            quarters => sample_chips.quarters, max_cloud => sample_chips.max_cloud,
            max_nodata => sample_chips.max_nodata, chip_size => sample_chips.chip_size,
            split => sample_chips.split, block_size => sample_chips.block_size,
            split_fractions => sample_chips.split_fractions,
            split_buffer => sample_chips.split_buffer
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
    SELECT chip_id, collection, item_id, chip_size, chip_index_x, chip_index_y, datetime,
           cloud_fraction, nodata_fraction, geometry
    FROM (SELECT * FROM from_offset UNION ALL SELECT * FROM wrapped) AS chosen
    ORDER BY lap, sample_key
$$;

-- Stratified sampling: each stratum present (`stratify_by` 'collection', 'year', 'quarter', or
-- 'cell' with `cell_size` degrees, see stacchip.chip_stratum) gives the same number of chips,
-- ceil(n / strata), fewer where a stratum has fewer (no redistribution); when that overshoots n
-- the total is cut to n in sampling order, so strata differ by at most one chip. Within a
-- stratum chips come in the same seeded order as `sample_chips`. This ranks every chip that
-- passes the filters (a sort of the filtered set, not of the table): filter first.
DROP FUNCTION IF EXISTS stacchip.sample_chips_stratified(
    int, bigint, text, float8, text[], float8[], geometry, timestamptz, timestamptz, int[], int[], real, real, int, text,
    float8, float8[], float8
);
CREATE FUNCTION stacchip.sample_chips_stratified(
    n int,
    seed bigint DEFAULT 0,
    stratify_by text DEFAULT 'collection',
    cell_size float8 DEFAULT 1.0,
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
    split_buffer float8 DEFAULT NULL
)
RETURNS TABLE (
    chip_id text,
    collection text,
    item_id text,
    chip_size int,
    chip_index_x int,
    chip_index_y int,
    datetime timestamptz,
    cloud_fraction real,
    nodata_fraction real,
    geometry geometry(Polygon, 4326)
)
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
    WITH keyed AS (
        -- OFFSET 0 keeps this level apart, so the md5 of each chip is computed once.
        SELECT s.*,
               stacchip.chip_stratum(sample_chips_stratified.stratify_by, s.collection,
                                     s.datetime, s.geometry,
                                     sample_chips_stratified.cell_size) AS stratum,
               stacchip.chip_sample_key(s.collection, s.item_id, s.chip_size,
                                        s.chip_index_x, s.chip_index_y) AS sample_key
        FROM stacchip.select_chips(
            collections => sample_chips_stratified.collections, bbox => sample_chips_stratified.bbox,
            intersects => sample_chips_stratified.intersects, start_time => sample_chips_stratified.start_time,
            end_time => sample_chips_stratified.end_time, months => sample_chips_stratified.months,
            quarters => sample_chips_stratified.quarters, max_cloud => sample_chips_stratified.max_cloud,
            max_nodata => sample_chips_stratified.max_nodata, chip_size => sample_chips_stratified.chip_size,
            split => sample_chips_stratified.split, block_size => sample_chips_stratified.block_size,
            split_fractions => sample_chips_stratified.split_fractions,
            split_buffer => sample_chips_stratified.split_buffer
        ) AS s
        OFFSET 0
    ),
    ranked AS (
        SELECT keyed.*,
               (sample_key < stacchip.sample_offset(sample_chips_stratified.seed))::int AS lap,
               row_number() OVER (
                   PARTITION BY stratum
                   ORDER BY sample_key < stacchip.sample_offset(sample_chips_stratified.seed),
                            sample_key
               ) AS rank_in_stratum
        FROM keyed
    ),
    -- No stratum needs more than n: cutting here first keeps the strata count cheap.
    capped AS (
        SELECT ranked.*, count(*) FILTER (WHERE rank_in_stratum = 1) OVER () AS strata
        FROM ranked
        WHERE rank_in_stratum <= sample_chips_stratified.n
    )
    SELECT chip_id, collection, item_id, chip_size, chip_index_x, chip_index_y, datetime,
           cloud_fraction, nodata_fraction, geometry
    FROM capped
    WHERE rank_in_stratum <= ceil(sample_chips_stratified.n::numeric / strata)
    ORDER BY rank_in_stratum, lap, sample_key
    LIMIT sample_chips_stratified.n
$$;
