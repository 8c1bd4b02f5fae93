-- What the selection functions (010) need of the auxiliary layers (alembic 0009,
-- stacchip_db/layers.py): the `within` geometry of a vector layer and the checked
-- `min_fractions` of raster layers. Both are called once per query (as a scalar subquery, an
-- InitPlan), so a bad layer name is one error, and the geometry is a constant the chips' GiST
-- index is searched with.

-- The features of vector layer `within[1]` (those whose column `within[2]` reads `within[3]`
-- as text, when given) collected into one geometry in EPSG:4326; NULL when none match (the
-- filter then keeps no chip). An unknown layer, a raster layer or an unknown column is an error.
CREATE OR REPLACE FUNCTION stacchip.layer_geometry(within text[])
RETURNS geometry
LANGUAGE plpgsql STABLE PARALLEL SAFE
AS $$
DECLARE
    found_layer stacchip.layers%ROWTYPE;
    result geometry;
BEGIN
    IF within IS NULL THEN
        RETURN NULL;
    END IF;
    IF cardinality(within) NOT IN (1, 3) OR within[1] IS NULL THEN
        RAISE EXCEPTION 'within must be {layer} or {layer, column, value}, not %', within
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT * INTO found_layer FROM stacchip.layers AS l WHERE l.name = within[1];
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown layer %: stacchip-db layer list shows the layers',
            quote_literal(within[1]) USING ERRCODE = 'undefined_object';
    END IF;
    IF found_layer.kind <> 'vector' THEN
        RAISE EXCEPTION 'layer % is a raster layer: within needs a vector layer (select raster '
            'classes with min_fractions)', quote_literal(within[1])
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF cardinality(within) = 1 THEN
        EXECUTE format('SELECT ST_Collect(geometry) FROM stacchip_layers.%I', within[1])
            INTO result;
    ELSE
        IF NOT within[2] = ANY (found_layer.columns) THEN
            RAISE EXCEPTION 'layer % has no column %; its columns: %', quote_literal(within[1]),
                quote_literal(within[2]), array_to_string(found_layer.columns, ', ')
                USING ERRCODE = 'undefined_column';
        END IF;
        EXECUTE format('SELECT ST_Collect(geometry) FROM stacchip_layers.%I WHERE %I::text = $1',
                       within[1], within[2])
            INTO result USING within[3];
    END IF;
    RETURN result;
END
$$;

-- `min_fractions` ({"layer": {"class": fraction, ...}, ...}) as given, once checked: every
-- layer a raster layer, every class one of its classes, every fraction a number 0..1.
CREATE OR REPLACE FUNCTION stacchip.checked_min_fractions(min_fractions jsonb)
RETURNS jsonb
LANGUAGE plpgsql STABLE PARALLEL SAFE
AS $$
DECLARE
    entry record;
    threshold record;
    found_layer stacchip.layers%ROWTYPE;
BEGIN
    IF min_fractions IS NULL THEN
        RETURN NULL;
    END IF;
    IF jsonb_typeof(min_fractions) <> 'object' THEN
        RAISE EXCEPTION 'min_fractions must be a JSON object {"layer": {"class": fraction}}'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOR entry IN SELECT * FROM jsonb_each(min_fractions) LOOP
        SELECT * INTO found_layer FROM stacchip.layers AS l WHERE l.name = entry.key;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'unknown layer %: stacchip-db layer list shows the layers',
                quote_literal(entry.key) USING ERRCODE = 'undefined_object';
        END IF;
        IF found_layer.kind <> 'raster' THEN
            RAISE EXCEPTION 'layer % is a vector layer: class fractions need a raster layer '
                '(select by a vector layer with within)', quote_literal(entry.key)
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        IF jsonb_typeof(entry.value) <> 'object' THEN
            RAISE EXCEPTION 'min_fractions of layer % must be {"class": fraction}',
                quote_literal(entry.key) USING ERRCODE = 'invalid_parameter_value';
        END IF;
        FOR threshold IN SELECT * FROM jsonb_each(entry.value) LOOP
            IF NOT threshold.key = ANY (found_layer.class_names) THEN
                RAISE EXCEPTION 'layer % has no class %; its classes: %',
                    quote_literal(entry.key), quote_literal(threshold.key),
                    array_to_string(found_layer.class_names, ', ')
                    USING ERRCODE = 'invalid_parameter_value';
            END IF;
            IF jsonb_typeof(threshold.value) <> 'number'
                    OR NOT (threshold.value::text::float8 BETWEEN 0 AND 1) THEN
                RAISE EXCEPTION 'fraction % of class % is not a number 0..1', threshold.value,
                    quote_literal(threshold.key) USING ERRCODE = 'invalid_parameter_value';
            END IF;
        END LOOP;
    END LOOP;
    RETURN min_fractions;
END
$$;
