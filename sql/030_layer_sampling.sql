-- Samples stratified by an auxiliary layer (alembic 0009, stacchip_db/layers.py), with
-- optional quotas, and what the restricted login may read of the layers (after 020, which
-- makes that login).
--
-- Strata: for a raster layer, a chip's dominant class (stacchip.chip_classes.dominant; chips
-- without fractions, or whose pixels are all nodata, are in no stratum); for a vector layer,
-- the stratum column (stacchip.layers.stratum_column) of the feature holding the centre of
-- the chip's footprint (the lowest feature_id when several do; chips whose centre no feature
-- holds are in no stratum).
--
-- Without quotas, like stacchip.sample_chips_stratified: each stratum present gives
-- k = ceil(n / strata present) chips (all it has when fewer), its first k in the seeded order,
-- cut to n in the order (rank in stratum, lap, sampling key).
-- With quotas ({"stratum": share, ...}): exactly round(share * n) chips (numeric, half up) of
-- each named stratum, its first ones in the seeded order (all it has when fewer: a NOTICE says
-- so), then the rest of n from the other strata in the seeded order. Rows come stratum by
-- stratum (named strata by name), then the rest. Same seed + same data = same chips on any
-- server: the order is stacchip.chip_sample_key, a hash of the chip key.
--
-- A raster stratum is walked through the (layer, dominant, sample_key) index of 0009 and each
-- chip looked up by key for the filters, so a stratum costs about k / (its share passing the
-- filters) index entries, whatever the table's size.

CALL stacchip.drop_functions('{sample_chips_by_layer}');

CREATE FUNCTION stacchip.sample_chips_by_layer(
    n int,
    seed bigint DEFAULT 0,
    layer text DEFAULT NULL,
    quotas jsonb DEFAULT NULL,
    {{filter_parameters}}
)
RETURNS SETOF stacchip.selected_chip
LANGUAGE plpgsql VOLATILE PARALLEL RESTRICTED
SET jit = off
AS $fn$
DECLARE
    -- Every dynamic query is run with `USING start_key, k, n, 0, <the filters>` ($5 on are the
    -- filters, as in sample_chips_stratified_run).
    start_key constant bigint := stacchip.sample_offset(seed);
    matching constant text := 'SELECT s AS chip, stacchip.chip_sample_key(s.collection, '
        's.item_id, s.chip_size, s.chip_index_x, s.chip_index_y) AS sample_key '
        'FROM stacchip.select_chips({{filter_arguments $5}}) AS s';
    by_class constant text := 'SELECT s AS chip, f.sample_key FROM stacchip.chip_classes AS f '
        'JOIN stacchip.select_chips({{filter_arguments $5}}) AS s '
        'ON s.collection = f.collection AND s.item_id = f.item_id '
        'AND s.chip_size = f.chip_size AND s.chip_index_x = f.chip_index_x '
        'AND s.chip_index_y = f.chip_index_y';
    found_layer stacchip.layers%ROWTYPE;
    strata text[];
    queries text[] := '{}';
    present int[] := '{}';
    names text[] := '{}';
    shares numeric[] := '{}';
    wanted int;
    got bigint;
    taken bigint := 0;
    k int;
    has_chips boolean;
    legs text := '';
    arms text := '';
    i int;
    j int;
BEGIN
    IF layer IS NULL THEN
        RAISE EXCEPTION 'layer is required: the layer whose strata are sampled'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT * INTO found_layer FROM stacchip.layers AS l WHERE l.name = layer;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown layer %: stacchip-db layer list shows the layers',
            quote_literal(layer) USING ERRCODE = 'undefined_object';
    END IF;

    IF found_layer.kind = 'raster' THEN
        -- The classes that are some chip's dominant one, by a skip scan of 0009's index.
        EXECUTE $q$
            WITH RECURSIVE walk AS (
                SELECT min(f.dominant) AS d FROM stacchip.chip_classes AS f WHERE f.layer = $1
                UNION ALL
                SELECT (SELECT min(f.dominant) FROM stacchip.chip_classes AS f
                        WHERE f.layer = $1 AND f.dominant > walk.d)
                FROM walk WHERE walk.d IS NOT NULL
            )
            SELECT coalesce(array_agg(d ORDER BY d), '{}') FROM walk WHERE d IS NOT NULL
        $q$ INTO strata USING layer;
        FOR i IN 1 .. cardinality(strata) LOOP
            queries := queries || format('%s WHERE f.layer = %L AND f.dominant = %L',
                                         by_class, layer, strata[i]);
        END LOOP;
    ELSE
        IF found_layer.stratum_column IS NULL THEN
            RAISE EXCEPTION 'vector layer % has no stratum column: add it again with '
                '--column COLUMN (the first column given is its strata)', quote_literal(layer)
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        EXECUTE format('SELECT coalesce(array_agg(DISTINCT t.%1$I::text ORDER BY t.%1$I::text) '
                       'FILTER (WHERE t.%1$I IS NOT NULL), ''{}'') FROM stacchip_layers.%2$I AS t',
                       found_layer.stratum_column, layer)
            INTO strata;
        FOR i IN 1 .. cardinality(strata) LOOP
            -- The chips near the stratum's features (GiST), then the feature holding the
            -- centre decides.
            queries := queries || format(
                '%1$s WHERE ST_Intersects(s.geometry, (SELECT ST_Collect(t.geometry) '
                'FROM stacchip_layers.%2$I AS t WHERE t.%3$I::text = %4$L)) '
                'AND (SELECT t.%3$I::text FROM stacchip_layers.%2$I AS t '
                'WHERE ST_Intersects(t.geometry, ST_Centroid(s.geometry)) '
                'ORDER BY t.feature_id LIMIT 1) = %4$L',
                matching, layer, found_layer.stratum_column, strata[i]);
        END LOOP;
    END IF;

    IF quotas IS NOT NULL THEN
        IF jsonb_typeof(quotas) <> 'object' THEN
            RAISE EXCEPTION 'quotas must be a JSON object {"stratum": share, ...}'
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        SELECT coalesce(array_agg(q.key ORDER BY q.key), '{}'),
               coalesce(array_agg(q.value::text::numeric ORDER BY q.key), '{}')
        INTO names, shares
        FROM jsonb_each(quotas) AS q
        WHERE jsonb_typeof(q.value) = 'number';
        IF cardinality(names) <> (SELECT count(*) FROM jsonb_object_keys(quotas)) THEN
            RAISE EXCEPTION 'quotas: every share must be a number' USING ERRCODE = 'invalid_parameter_value';
        END IF;
        FOR i IN 1 .. cardinality(names) LOOP
            IF NOT (shares[i] > 0 AND shares[i] <= 1) THEN
                RAISE EXCEPTION 'quotas: share % of % is not in (0, 1]', shares[i],
                    quote_literal(names[i]) USING ERRCODE = 'invalid_parameter_value';
            END IF;
            IF NOT (names[i] = ANY (strata) OR names[i] = ANY (coalesce(found_layer.class_names, '{}'))) THEN
                RAISE EXCEPTION 'layer % has no stratum %; its strata: %', quote_literal(layer),
                    quote_literal(names[i]), array_to_string(strata, ', ')
                    USING ERRCODE = 'invalid_parameter_value';
            END IF;
        END LOOP;
        IF (SELECT sum(s) FROM unnest(shares) AS s) > 1 THEN
            RAISE EXCEPTION 'quotas: the shares add up to more than 1'
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        IF n IS NOT NULL AND (SELECT sum(round(s * n)) FROM unnest(shares) AS s) > n THEN
            RAISE EXCEPTION 'quotas: the shares round to more chips than the sample size %', n
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
    END IF;

    IF n IS NULL OR n <= 0 THEN
        RETURN;
    END IF;

    IF quotas IS NULL THEN
        FOR i IN 1 .. cardinality(queries) LOOP
            EXECUTE format('SELECT EXISTS (%s)', queries[i]) INTO has_chips
                USING start_key, k, n, 0::float8, {{filter_values}};
            IF has_chips THEN
                present := present || i;
            END IF;
        END LOOP;
        IF cardinality(present) = 0 THEN
            RETURN;
        END IF;
        k := ceil(n::numeric / cardinality(present));
        FOR j IN 1 .. cardinality(present) LOOP
            legs := legs || stacchip.seeded_walk_legs(j, queries[present[j]], '$2') || ',';
            arms := arms || CASE WHEN j > 1 THEN ' UNION ALL ' ELSE '' END || format(
                'SELECT %1$s AS stratum, * FROM up_%1$s UNION ALL SELECT %1$s, * FROM wrapped_%1$s',
                j);
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
            $q$, legs, arms)
        USING start_key, k, n, 0::float8, {{filter_values}};
        RETURN;
    END IF;

    -- Quotas: each named stratum's first round(share * n), one stratum at a time.
    FOR i IN 1 .. cardinality(names) LOOP
        wanted := round(shares[i] * n);
        j := array_position(strata, names[i]);
        got := 0;
        IF wanted > 0 AND j IS NOT NULL THEN
            RETURN QUERY EXECUTE format(
                'WITH %s SELECT (t.chip).* FROM (SELECT * FROM up_1 UNION ALL '
                'SELECT * FROM wrapped_1) AS t ORDER BY t.lap, t.sample_key',
                stacchip.seeded_walk_legs(1, queries[j], '$2'))
            USING start_key, wanted, n, 0::float8, {{filter_values}};
            GET DIAGNOSTICS got = ROW_COUNT;
        END IF;
        IF got < wanted THEN
            RAISE NOTICE 'stratum % of layer % has % of the % chips its quota asks',
                quote_literal(names[i]), quote_literal(layer), got, wanted;
        END IF;
        taken := taken + got;
    END LOOP;

    -- The rest: the first n - taken chips of the other strata in the seeded order (the first
    -- of each other stratum, merged).
    k := n - taken;
    IF k <= 0 THEN
        RETURN;
    END IF;
    j := 0;
    FOR i IN 1 .. cardinality(strata) LOOP
        CONTINUE WHEN strata[i] = ANY (names);
        j := j + 1;
        legs := legs || CASE WHEN j > 1 THEN ',' ELSE '' END
            || stacchip.seeded_walk_legs(j, queries[i], '$2');
        arms := arms || CASE WHEN j > 1 THEN ' UNION ALL ' ELSE '' END
            || format('SELECT * FROM up_%1$s UNION ALL SELECT * FROM wrapped_%1$s', j);
    END LOOP;
    IF j = 0 THEN
        RAISE NOTICE 'layer % has no stratum besides the quotas'' to give the other % chips',
            quote_literal(layer), k;
        RETURN;
    END IF;
    RETURN QUERY EXECUTE format(
        'WITH %s SELECT (t.chip).* FROM (%s) AS t ORDER BY t.lap, t.sample_key LIMIT $2',
        legs, arms)
    USING start_key, k, n, 0::float8, {{filter_values}};
    GET DIAGNOSTICS got = ROW_COUNT;
    IF got < k THEN
        RAISE NOTICE 'the other strata of layer % have % of the % chips left to sample',
            quote_literal(layer), got, k;
    END IF;
END
$fn$;

-- Its seeded legs are sql/010's stacchip.seeded_walk_legs now.
DROP FUNCTION IF EXISTS stacchip.layer_sample_legs(int, text, text);

-- The restricted login of 020 reads the layers: their schema and every table in it (a layer
-- added later is granted by `layer add`).
DO $$
DECLARE
    wanted name := (SELECT role FROM stacchip.query_login);
BEGIN
    IF wanted IS NOT NULL AND EXISTS (SELECT FROM pg_roles WHERE rolname = wanted) THEN
        EXECUTE format('GRANT USAGE ON SCHEMA stacchip_layers TO %I', wanted);
        EXECUTE format('GRANT SELECT ON ALL TABLES IN SCHEMA stacchip_layers TO %I', wanted);
        EXECUTE format('GRANT EXECUTE ON FUNCTION stacchip.sample_chips_by_layer, '
                       'stacchip.layer_geometry, '
                       'stacchip.checked_min_fractions TO %I', wanted);
    END IF;
EXCEPTION WHEN insufficient_privilege THEN
    RAISE NOTICE 'cannot grant the layers to the restricted login (%)', SQLERRM;
END
$$;
