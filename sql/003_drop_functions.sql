-- Dropping the SQL files' own functions before they are created again, every version of each
-- whatever its parameters: a parameter added or removed changes the signature, and an old
-- signature left beside the new one would make named calls ambiguous. By name (and, with
-- `returning_type`, every function returning that type, which would otherwise keep the type
-- from being dropped), from the catalog, so that no signature is written by hand. A procedure,
-- so that 020's grant of the functions to the restricted login does not reach it (and only an
-- owner of the functions can drop them anyway).
CREATE OR REPLACE PROCEDURE stacchip.drop_functions(
    names text[], returning_type text DEFAULT NULL
)
LANGUAGE plpgsql
AS $$
DECLARE
    old regprocedure;
BEGIN
    FOR old IN
        SELECT p.oid FROM pg_proc AS p
        WHERE p.pronamespace = 'stacchip'::regnamespace AND p.prokind = 'f'
          AND (p.proname = ANY (names) OR p.prorettype = to_regtype(returning_type))
    LOOP
        EXECUTE format('DROP FUNCTION %s', old);
    END LOOP;
END
$$;
